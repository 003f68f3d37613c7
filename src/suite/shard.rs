//! `--shard I/N`: a deterministic partition of a suite's cases into N parts, one per
//! machine (a Slurm array task, a GitHub Actions matrix job, a Kubernetes job index).

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

/// Part `index` (1-based) of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// Which part, 1 to `count`.
    pub index: usize,
    /// How many parts.
    pub count: usize,
}

/// The most parts a suite may be cut into: more than any array or matrix a user would
/// start, few enough that a typo (`--shard 1/4000`) is caught.
pub const MAX_SHARDS: usize = 1024;

impl FromStr for Shard {
    type Err = String;

    fn from_str(text: &str) -> Result<Shard, String> {
        let expected = "expected I/N with 1 ≤ I ≤ N, as in 1/4 (Slurm: \
                        $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT with --array=1-N)";
        let (index, count) = text.split_once('/').ok_or_else(|| format!("found {text:?}, {expected}"))?;
        let parse = |s: &str| s.trim().parse::<usize>().map_err(|_| format!("found {text:?}, {expected}"));
        let (index, count) = (parse(index)?, parse(count)?);
        if index == 0 || index > count {
            return Err(format!("found {text:?}, {expected}"));
        }
        if count > MAX_SHARDS {
            return Err(format!("found {text:?}: at most {MAX_SHARDS} shards"));
        }
        Ok(Shard { index, count })
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// The positions of the cases this shard runs, out of `cases` in suite order.
    ///
    /// Shards are contiguous runs of the suite order (model by model), their sizes
    /// differing by at most one: a model's cases stay on as few machines as the balance
    /// allows, so few shards repeat a model's reference pass. The partition depends only on
    /// the number of cases and shards, so every machine computes the same one.
    pub fn range(&self, cases: usize) -> Range<usize> {
        let (base, extra) = (cases / self.count, cases % self.count);
        let i = self.index - 1;
        let start = i * base + i.min(extra);
        let len = base + usize::from(i < extra);
        start..start + len
    }

    /// The ids among `cases` (suite order) that this shard runs.
    pub fn select<'a>(&self, cases: &'a [String]) -> &'a [String] {
        &cases[self.range(cases.len())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_one_based_parts_and_refuses_the_rest() {
        assert_eq!("2/4".parse::<Shard>(), Ok(Shard { index: 2, count: 4 }));
        assert_eq!("1/1".parse::<Shard>(), Ok(Shard { index: 1, count: 1 }));
        for bad in ["0/4", "5/4", "4", "a/4", "1/0", "-1/4", "1/4/2", "1/5000"] {
            let err = bad.parse::<Shard>().unwrap_err();
            assert!(err.contains(bad), "{bad}: {err}");
        }
        assert_eq!(Shard { index: 3, count: 8 }.to_string(), "3/8");
    }

    /// A small deterministic generator for the property test (no dependency).
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn shards_are_disjoint_covering_contiguous_and_balanced() {
        let mut state = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..500 {
            let models = 1 + next(&mut state) as usize % 6;
            let schemes = 1 + next(&mut state) as usize % 20;
            let cases: Vec<String> =
                (0..models).flat_map(|m| (0..schemes).map(move |s| format!("m{m}/s{s}"))).collect();
            for count in 1..=64 {
                let parts: Vec<&[String]> =
                    (1..=count).map(|index| Shard { index, count }.select(&cases)).collect();
                let joined: Vec<String> = parts.iter().flat_map(|p| p.iter().cloned()).collect();
                // Concatenated in shard order they are the suite order: disjoint and covering.
                assert_eq!(joined, cases, "{models}×{schemes} cases in {count} shards");
                let sizes: Vec<usize> = parts.iter().map(|p| p.len()).collect();
                let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                assert!(max - min <= 1, "sizes {sizes:?}");
                // Each model is spread over at most ceil(its cases / smallest non-empty
                // shard) + 1 shards.
                for m in 0..models {
                    let holding =
                        parts.iter().filter(|p| p.iter().any(|id| id.starts_with(&format!("m{m}/")))).count();
                    let smallest = (*min).max(1);
                    assert!(holding <= schemes.div_ceil(smallest) + 1, "model m{m} on {holding} shards");
                }
            }
        }
    }
}
