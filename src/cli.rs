//! The command line: clap definitions and the commands behind them.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;

use crate::error::{Error, Result, ResultExt};
use crate::measure::embedding;
use crate::measure::profile::{profile_model, render, ProfileOptions};
use crate::measure::METRICS;
use crate::model::generate::greedy;
use crate::model::{self, builtin, Model, ModelFiles, QuantizeFactory, ARCHS};
use crate::report::{self, baseline, compare, Results};
use crate::runner::{self, RunOptions};
use crate::scheme::{self, FloatStorage, SchemeInfo, SCHEMES};
use crate::suite::{Plan, Shard};
use crate::tensor;

/// Exit code for success.
pub const EXIT_OK: i32 = 0;
/// Exit code for an error.
pub const EXIT_ERROR: i32 = 1;
/// Exit code for a regression found by `compare` (or `run --baseline`) with
/// `--fail-on-regression`.
pub const EXIT_REGRESSION: i32 = 2;
/// Exit code for a malformed command line (an unknown option, a missing argument): 64,
/// `EX_USAGE` of sysexits.h, so that it can never be mistaken for a regression.
pub const EXIT_USAGE: i32 = 64;

/// What a quantization scheme costs and buys: memory, disk, latency and divergence from
/// the full-precision model, in one run.
#[derive(Debug, Parser)]
#[command(name = "bench", version, about, long_about = None)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a suite: every model × scheme, measured; writes results.json, results.md, results.csv.
    Run {
        /// Suite YAML file.
        suite: PathBuf,
        /// Output folder (default: runs/SUITE-NAME, which git ignores).
        #[arg(long, conflicts_with = "publish")]
        out: Option<PathBuf>,
        /// Write to the suite's published report folder (its `output`, else
        /// reports/SUITE-NAME): refresh a committed example report.
        #[arg(long)]
        publish: bool,
        /// Keep the finished cases of an earlier run in the output folder and skip them.
        #[arg(long)]
        resume: bool,
        /// Run only cases whose id (model/scheme-label) matches: a substring, or a pattern with `*`.
        #[arg(long)]
        filter: Option<String>,
        /// Keep each saved quantized model under OUT/models/.
        #[arg(long)]
        keep_models: bool,
        /// Run part I of N (1-based) of the cases, for one machine of many; `bench merge`
        /// joins the parts. Parts are contiguous in suite order and differ by at most one case.
        /// Default output: runs/SUITE-NAME/shard-I.
        #[arg(long, value_name = "I/N", conflicts_with = "publish")]
        shard: Option<Shard>,
        /// Read divergence references from DIR, and store the ones computed there
        /// (default OUT/references/): a folder the shards share, or an earlier run's.
        #[arg(long, value_name = "DIR")]
        references: Option<PathBuf>,
        /// Replace the workload's batch_size (recorded in results.json): one suite timed at
        /// batch 1, 8 and 32 in three runs, where speed-ups change sign.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
        batch_size: Option<u32>,
        /// Also store the results as baseline NAME under reports/baselines/NAME/.
        #[arg(long, value_name = "NAME")]
        save_baseline: Option<String>,
        /// Compare the results with baseline NAME (reports/baselines/NAME/) at the end.
        #[arg(long, value_name = "NAME")]
        baseline: Option<String>,
        /// With --baseline: exit with 2 when a metric regressed.
        #[arg(long, requires = "baseline")]
        fail_on_regression: bool,
    },
    /// Merge the shards of one run (`run --shard I/N`) into one results.json and its reports.
    Merge {
        /// The shards' output folders (or their results.json files).
        #[arg(required = true)]
        run_dirs: Vec<PathBuf>,
        /// Output folder for the merged results.json and reports.
        #[arg(long)]
        out: PathBuf,
        /// Merge even when planned cases are missing (they are listed).
        #[arg(long)]
        allow_partial: bool,
        /// Compare the merged results with baseline NAME (reports/baselines/NAME/).
        #[arg(long, value_name = "NAME")]
        baseline: Option<String>,
        /// With --baseline: exit with 2 when a metric regressed.
        #[arg(long, requires = "baseline")]
        fail_on_regression: bool,
    },
    /// Render results.md, results.csv, summary.md, the charts and index.html from results.json.
    Report {
        /// A run's output folder, or its results.json.
        run_dir: PathBuf,
    },
    /// Compare two runs: per case and metric, improved, regressed or within noise.
    Compare {
        /// The baseline: a run folder or a results.json.
        baseline: PathBuf,
        /// The new run: a run folder or a results.json.
        new: PathBuf,
        /// Exit with 2 when a metric regressed.
        #[arg(long)]
        fail_on_regression: bool,
        /// Relative change of a median timing treated as noise (default: the new suite's
        /// `noise_threshold`, else 0.02).
        #[arg(long, value_name = "FRACTION")]
        noise_threshold: Option<f64>,
        /// Folder for compare.md and compare.html (default: the new run's folder).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Check a suite (paths, names, parameters, models) without running it.
    Validate {
        /// Suite YAML file.
        suite: PathBuf,
        /// Also print which cases each of N shards (`run --shard I/N`) would run.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=crate::suite::shard::MAX_SHARDS as i64))]
        shards: Option<u32>,
    },
    /// Show a model's architecture, parameters, dtypes and bytes per tensor group.
    Inspect {
        /// Model directory or builtin:NAME.
        model: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List what the registries hold.
    List {
        /// Which registry.
        what: ListWhat,
        /// Print a Markdown table (the README's tables come from this).
        #[arg(long)]
        markdown: bool,
    },
    /// Greedy continuation of prompts with one scheme, with prefill and per-token times.
    Generate(GenerateArgs),
    /// Sentence embeddings from an encoder (BERT, MiniLM) with one scheme.
    Embed(EmbedArgs),
    /// Time one forward pass per op kind (linear kinds, attention, norms, activations,
    /// activation quantization, dequantization) against this machine's measured peaks.
    Profile(ProfileArgs),
    /// Write a built-in model (config.json, model.safetensors, tokenizer.json) into a folder.
    Builtin {
        /// Built-in model name (see `bench list builtins`).
        name: String,
        /// Destination folder.
        dir: PathBuf,
    },
}

/// Registries `bench list` shows.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ListWhat {
    /// Quantization schemes.
    Schemes,
    /// Metrics.
    Metrics,
    /// Model architectures.
    Archs,
    /// Built-in models.
    Builtins,
}

/// How `generate`, `embed` and `profile` build their model: a scheme with parameters, over
/// weights held at a precision.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Scheme to apply (default fp32).
    #[arg(long, default_value = "fp32")]
    pub scheme: String,
    /// A scheme parameter, as a suite would set it: KEY=VALUE, VALUE read as JSON (true,
    /// 64, 0.5) and else as text; checked with the suite's rules. Repeatable.
    #[arg(long = "param", value_name = "KEY=VALUE")]
    pub params: Vec<String>,
    /// The precision weights are held at before the scheme applies, as a suite's `dtype:`:
    /// auto (the checkpoint's own: bf16 stays bf16), f32, f16 or bf16.
    #[arg(long, default_value = "auto", value_parser = parse_dtype)]
    pub dtype: Dtype,
}

/// `--dtype`'s value: a precision, or `None` for `auto`.
#[derive(Debug, Clone, Copy)]
pub struct Dtype(pub Option<FloatStorage>);

fn parse_dtype(name: &str) -> std::result::Result<Dtype, String> {
    FloatStorage::parse_dtype(name).map(Dtype).ok_or_else(|| {
        format!("`{name}` is not a precision, expected one of: {}", FloatStorage::dtype_names())
    })
}

/// Arguments of `bench generate`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "prompts"])))]
pub struct GenerateArgs {
    /// Model directory or builtin:NAME.
    pub model: String,
    /// The scheme, its parameters and the reference precision.
    #[command(flatten)]
    pub build: BuildArgs,
    /// One prompt.
    #[arg(long)]
    pub prompt: Option<String>,
    /// A prompts file: one per line, or .jsonl ({"prompt": …} or a string per line), or a
    /// .json/.yaml list (multi-line prompts whole).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Tokens to generate per prompt.
    #[arg(long, default_value_t = 16)]
    pub max_new_tokens: usize,
    /// With --json: how many most likely tokens to list per position.
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    /// Print JSON: ids, text, and the top-k log-probabilities of every position.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `bench profile`.
#[derive(Debug, Args)]
pub struct ProfileArgs {
    /// Model directory, GGUF file or builtin:NAME.
    pub model: String,
    /// The scheme, its parameters and the reference precision.
    #[command(flatten)]
    pub build: BuildArgs,
    /// Sequences per pass.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Tokens per sequence (the prompt, for decoders).
    #[arg(long, default_value_t = 64)]
    pub tokens: usize,
    /// Profile decode steps after the prompt instead of the prompt's pass.
    #[arg(long)]
    pub decode: bool,
    /// Passes (or decode steps) profiled, after one warm-up.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
}

/// Arguments of `bench embed`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["sentence", "sentences"])))]
pub struct EmbedArgs {
    /// Model directory or builtin:NAME.
    pub model: String,
    /// The scheme, its parameters and the reference precision.
    #[command(flatten)]
    pub build: BuildArgs,
    /// One sentence.
    #[arg(long)]
    pub sentence: Option<String>,
    /// A sentences file: one per line, or .jsonl, .json or .yaml as for `generate --prompts`.
    #[arg(long)]
    pub sentences: Option<PathBuf>,
    /// Print JSON: ids and the full embedding of every sentence.
    #[arg(long)]
    pub json: bool,
}

/// Run a parsed command line; returns the exit code.
pub fn execute(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Run {
            suite,
            out,
            publish,
            resume,
            filter,
            keep_models,
            shard,
            references,
            batch_size,
            save_baseline,
            baseline,
            fail_on_regression,
        } => {
            let mut plan = Plan::load(&suite)?;
            if let Some(rows) = batch_size {
                plan.workload.batch_size = rows as usize;
            }
            let baselines = Path::new(baseline::BASELINES_DIR);
            // Check names before the work, not after it.
            if let Some(name) = &save_baseline {
                baseline::dir(baselines, name)?;
            }
            let baseline_path =
                baseline.as_deref().map(|name| baseline::path(baselines, name)).transpose()?;
            let out = out.unwrap_or_else(|| match (publish, shard) {
                (true, _) => plan.output.clone(),
                (false, Some(shard)) => plan.run_folder().join(format!("shard-{}", shard.index)),
                (false, None) => plan.run_folder(),
            });
            let options =
                RunOptions { out: Some(out), resume, filter, keep_models, shard, references, clock: None };
            let (dir, results) = runner::run(&plan, &options)?;
            // The compact per-model tables; every column is in results.md and results.csv.
            println!("{}", report::summary::model_tables(&results).trim());
            println!(
                "\nevery column: {}, {}",
                dir.join("results.md").display(),
                dir.join("results.csv").display()
            );
            for case in &results.cases {
                for w in &case.warnings {
                    eprintln!("warning: {}: {w}", case.id);
                }
            }
            eprintln!(
                "wrote {} and {}",
                dir.join("results.json").display(),
                dir.join("index.html").display()
            );
            if let Some(name) = &save_baseline {
                let path = baseline::save(baselines, name, &results)?;
                eprintln!("saved baseline {name} to {}", path.display());
            }
            if let Some(base_path) = baseline_path {
                return against_baseline(&base_path, &results, &dir, fail_on_regression);
            }
        }
        Command::Merge { run_dirs, out, allow_partial, baseline, fail_on_regression } => {
            let baselines = Path::new(baseline::BASELINES_DIR);
            let baseline_path =
                baseline.as_deref().map(|name| baseline::path(baselines, name)).transpose()?;
            let results = merge(&run_dirs, &out, allow_partial)?;
            if let Some(base_path) = baseline_path {
                return against_baseline(&base_path, &results, &out, fail_on_regression);
            }
        }
        Command::Report { run_dir } => {
            let path = report::results_path(&run_dir);
            let results = Results::read(&path)?;
            let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            let written = report::render(&results, dir)?;
            for file in written {
                eprintln!("wrote {}", file.display());
            }
        }
        Command::Compare { baseline, new, fail_on_regression, noise_threshold, out } => {
            if let Some(t) = noise_threshold.filter(|t| !(*t > 0.0 && *t < 1.0)) {
                return Err(Error::Render(format!(
                    "--noise-threshold is {t}, expected a fraction between 0 and 1 (0.02 = 2%)"
                )));
            }
            let (base_path, new_path) = (report::results_path(&baseline), report::results_path(&new));
            let base = Results::read(&base_path)?;
            let results = Results::read(&new_path)?;
            let dir = out.unwrap_or_else(|| {
                new_path
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."))
                    .to_path_buf()
            });
            let comparison = write_comparison(&base, &base_path, &results, &new_path, noise_threshold, &dir)?;
            if fail_on_regression {
                return gate(&comparison);
            }
        }
        Command::Validate { suite, shards } => {
            let plan = Plan::load(&suite)?;
            runner::lock::check_output_folder(&plan.run_folder())?;
            for model in &plan.models {
                model.files.check_finite_weights().with_context(|| format!("model {}", model.name))?;
            }
            println!(
                "{}: ok — {} models × {} schemes = {} cases on {}",
                suite.display(),
                plan.models.len(),
                plan.schemes.len(),
                plan.case_ids().len(),
                plan.device
            );
            let cases = plan.case_ids();
            for index in 1..=shards.unwrap_or(0) as usize {
                let shard = Shard { index, count: shards.unwrap_or(0) as usize };
                println!("shard {shard}: {}", shard.select(&cases).join(", "));
            }
        }
        Command::Inspect { model, json } => inspect(&model, json)?,
        Command::List { what, markdown } => print!("{}", list(what, markdown)),
        Command::Generate(args) => generate(&args)?,
        Command::Embed(args) => embed(&args)?,
        Command::Profile(args) => profile(&args)?,
        Command::Builtin { name, dir } => {
            builtin::write_to(&name, &dir)?;
            println!("wrote {}{name} to {}", builtin::PREFIX, dir.display());
        }
    }
    Ok(EXIT_OK)
}

/// The exit code of a `--fail-on-regression` gate: [`EXIT_REGRESSION`] when a metric
/// regressed or a baseline case or metric is missing from the new run; an error when the
/// runs did different work, which no verdict can judge.
fn gate(comparison: &compare::Comparison) -> Result<i32> {
    if !comparison.workload_differences.is_empty() {
        return Err(Error::Render(format!(
            "cannot gate: the workloads differ in {}; measure the baseline and the new run with the \
             same workload",
            comparison.workload_differences.join(", ")
        )));
    }
    Ok(if comparison.gate_failures() > 0 { EXIT_REGRESSION } else { EXIT_OK })
}

/// `--baseline`: compare `results` (written to `dir/results.json`) with the baseline at
/// `base_path`, writing compare.md and compare.html into `dir`; the exit code, gated with
/// `--fail-on-regression`.
fn against_baseline(
    base_path: &Path,
    results: &Results,
    dir: &Path,
    fail_on_regression: bool,
) -> Result<i32> {
    let base = Results::read(base_path)?;
    let comparison = write_comparison(&base, base_path, results, &dir.join("results.json"), None, dir)?;
    if fail_on_regression {
        return gate(&comparison);
    }
    Ok(EXIT_OK)
}

/// Compare, write compare.md and compare.html into `dir`, print compare.md; returns the
/// comparison.
fn write_comparison(
    base: &Results,
    base_path: &Path,
    new: &Results,
    new_path: &Path,
    threshold: Option<f64>,
    dir: &Path,
) -> Result<compare::Comparison> {
    let comparison = compare::compare(base, base_path, new, new_path, threshold);
    let md = compare::markdown(&comparison);
    crate::files::write_atomic(&dir.join("compare.md"), md.as_bytes())?;
    crate::files::write_atomic(&dir.join("compare.html"), compare::html(&comparison).as_bytes())?;
    println!("{md}");
    eprintln!("{}: {}", dir.join("compare.md").display(), comparison.headline());
    Ok(comparison)
}

/// `bench merge`: read every shard, merge, write results.json and the reports into `out`.
fn merge(run_dirs: &[PathBuf], out: &Path, allow_partial: bool) -> Result<Results> {
    let mut inputs = Vec::new();
    for dir in run_dirs {
        let path = report::results_path(dir);
        if path.parent().is_some_and(|parent| crate::files::same_folder(parent, out)) {
            return Err(Error::Merge(format!(
                "--out {} is the folder of shard {}: merge into a folder of its own",
                out.display(),
                path.display()
            )));
        }
        inputs.push((path.clone(), Results::read(&path)?));
    }
    let merged = report::merge::merge(inputs, allow_partial)?;
    for id in &merged.missing {
        eprintln!("warning: case {id} is missing: no shard has it (--allow-partial)");
    }
    let results_path = out.join("results.json");
    merged.results.write(&results_path)?;
    report::render(&merged.results, out)?;
    println!("{}", report::summary::model_tables(&merged.results).trim());
    let machines = report::summary::machines(&merged.results);
    eprintln!(
        "merged {} shards ({} cases, {} machine{}) into {}",
        merged.results.shards.len(),
        merged.results.cases.len(),
        machines.len(),
        if machines.len() == 1 { "" } else { "s" },
        results_path.display()
    );
    Ok(merged.results)
}

fn open_model(spec: &str) -> Result<ModelFiles> {
    ModelFiles::open(&model::resolve_model_path(spec, Path::new("."))?)
}

fn inspect(spec: &str, as_json: bool) -> Result<()> {
    let files = open_model(spec)?;
    let summary = files.summary()?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&summary).expect("summary serialises"));
        return Ok(());
    }
    println!("model        {}", files.dir.display());
    println!("architecture {}", summary.arch);
    println!(
        "parameters   {} ({} in quantizable linear layers, {:.1}%)",
        summary.parameters,
        summary.linear_parameters,
        100.0 * summary.linear_parameters as f64 / summary.parameters.max(1) as f64
    );
    let dtypes: Vec<String> = summary.dtypes.iter().map(|(d, n)| format!("{d} × {n}")).collect();
    println!("dtypes       {}", dtypes.join(", "));
    println!("tokenizer    {} tokens", summary.tokenizer_vocab);
    println!("stored bytes by tensor kind:");
    for (kind, bytes) in &summary.stored_bytes {
        println!("  {kind:<8} {bytes:>14}  ({:.2} MiB)", *bytes as f64 / 1048576.0);
    }
    if !summary.skipped.is_empty() {
        println!("skipped (not used by {}): {}", summary.arch, summary.skipped.join(", "));
    }
    Ok(())
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// The listing of a registry, as aligned text or a Markdown table.
pub fn list(what: ListWhat, markdown: bool) -> String {
    let (headers, rows): (Vec<&str>, Vec<Vec<String>>) = match what {
        ListWhat::Schemes => (
            vec!["scheme", "bits/weight", "block", "calibration", "devices", "parameters", "summary"],
            SCHEMES
                .iter()
                .map(|s| {
                    let params: Vec<&str> = s.params.iter().map(|p| p.name).collect();
                    vec![
                        s.name.to_string(),
                        format!("{}", s.bits_per_weight),
                        s.block_size.map_or("–".into(), |b| b.to_string()),
                        yes_no(s.needs_calibration).into(),
                        s.devices.name().into(),
                        if params.is_empty() { "–".into() } else { params.join(", ") },
                        s.summary.into(),
                    ]
                })
                .collect(),
        ),
        ListWhat::Metrics => (
            vec!["metric", "group", "unit", "better", "tolerance", "summary"],
            METRICS
                .iter()
                .map(|m| {
                    vec![
                        m.name.into(),
                        m.group.name().into(),
                        if m.unit.is_empty() { "–".into() } else { m.unit.into() },
                        if m.higher_is_better { "higher" } else { "lower" }.into(),
                        format!("{}%", m.tolerance * 100.0),
                        m.summary.into(),
                    ]
                })
                .collect(),
        ),
        ListWhat::Archs => (
            vec!["arch", "kind", "model_type", "quantized layers", "summary"],
            ARCHS
                .iter()
                .map(|a| {
                    let kind =
                        serde_json::to_value(a.kind).expect("serialises").as_str().unwrap_or("").to_string();
                    vec![
                        a.name.into(),
                        kind,
                        a.model_types.join(", "),
                        a.quantizable.into(),
                        a.summary.into(),
                    ]
                })
                .collect(),
        ),
        ListWhat::Builtins => (
            vec!["model", "summary"],
            builtin::BUILTINS
                .iter()
                .map(|b| vec![format!("{}{}", builtin::PREFIX, b.name), b.summary.into()])
                .collect(),
        ),
    };
    if markdown {
        let mut out = format!("| {} |\n|{}|\n", headers.join(" | "), vec!["---"; headers.len()].join("|"));
        for row in rows {
            out.push_str(&format!("| {} |\n", row.join(" | ")));
        }
        return out;
    }
    let widths: Vec<usize> = (0..headers.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).chain([headers[i].len()]).max().unwrap_or(0))
        .collect();
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        padded.join("  ").trim_end().to_string() + "\n"
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push_str(&line(row));
    }
    out
}

/// The inputs of `generate` or `embed`: one given on the command line, or the non-empty
/// lines of a file.
fn read_inputs(single: &Option<String>, file: &Option<PathBuf>) -> Result<Vec<String>> {
    // inputs::read refuses a file without a non-empty input.
    match (single, file) {
        (Some(text), _) => Ok(vec![text.clone()]),
        (None, Some(file)) => crate::inputs::read(file),
        (None, None) => unreachable!("clap requires one of the two"),
    }
}

/// Open `spec` and build it as `build` says.
fn build_with_scheme(spec: &str, build: &BuildArgs) -> Result<(ModelFiles, Model, &'static SchemeInfo)> {
    let info = scheme::lookup(&build.scheme)?;
    let params = info.validate_params(parse_params(&build.params)?)?;
    let scheme = (info.build)(&params)?;
    let quantize_head = params.bool("quantize_head", false);
    let files = open_model(spec)?;
    let precision = match build.dtype.0 {
        Some(precision) => precision,
        None => files.stored_precision()?,
    };
    let model =
        files.build(&mut QuantizeFactory::new(&files.store, precision, scheme.as_ref(), quantize_head))?;
    // Loading left freed f32 copies of each weight in the heap: give them back.
    crate::measure::memory::release_free_heap();
    Ok((files, model, info))
}

/// `--param KEY=VALUE` options as a suite's parameter map: VALUE as JSON where it parses
/// (`true`, `64`, `0.5`, `"text"`), else as text.
fn parse_params(params: &[String]) -> Result<std::collections::BTreeMap<String, serde_json::Value>> {
    params
        .iter()
        .map(|p| {
            let (key, value) = p.split_once('=').filter(|(k, _)| !k.trim().is_empty()).ok_or_else(|| {
                Error::Workload(format!("--param {p:?} has no key, expected KEY=VALUE (exact_gemv=true)"))
            })?;
            let value = serde_json::from_str(value.trim()).unwrap_or_else(|_| json!(value.trim()));
            Ok((key.trim().to_string(), value))
        })
        .collect()
}

fn generate(args: &GenerateArgs) -> Result<()> {
    let prompts = read_inputs(&args.prompt, &args.prompts)?;
    let (files, model, info) = build_with_scheme(&args.model, &args.build)?;
    let model = model.causal("bench generate")?;
    let tokenizer = &files.tokenizer;
    // --json streams its document: a record, and within it a position's top-k list, is
    // written as soon as it is made, so memory does not grow with top-k × positions (the
    // whole vocabulary as top-k is 1.5 GB of JSON values for a 9-token prompt).
    let stdout = std::io::stdout();
    let mut json_out = args.json.then(|| JsonOut::new(stdout.lock()));
    if let Some(out) = json_out.as_mut() {
        out.raw(&format!(
            "{{\"model\": {}, \"scheme\": {}, \"top_k\": {}, \"prompts\": [",
            json!(args.model),
            json!(info.name),
            args.top_k
        ))?;
    }
    for (index, prompt) in prompts.iter().enumerate() {
        let ids = tokenizer.encode(prompt)?;
        if ids.is_empty() {
            return Err(Error::Workload(format!("prompt {prompt:?} has no tokens")));
        }
        let what = format!("prompt {prompt:?} ({} tokens) + --max-new-tokens", ids.len());
        files.check_positions(ids.len().saturating_add(args.max_new_tokens), &what)?;
        let timed = greedy(model, &ids, args.max_new_tokens, false)?;
        let text = tokenizer.decode(&timed.ids)?;
        let step_ms = crate::measure::latency::Stats::of(&timed.step_s).map(|s| s.median * 1e3);
        let Some(out) = json_out.as_mut() else {
            println!("{prompt}{text}");
            println!(
                "  [{} prompt tokens, prefill {:.2} ms, decode {} ms/token median over {} steps, scheme {}]",
                ids.len(),
                timed.prefill_s * 1e3,
                step_ms.map_or("–".into(), |m| format!("{m:.3}")),
                timed.step_s.len(),
                info.name
            );
            continue;
        };
        let with_logits = greedy(model, &ids, args.max_new_tokens, true)?;
        let head = json!({
            "prompt": prompt,
            "input_ids": ids,
            "generated_ids": timed.ids,
            "text": text,
            "prefill_ms": timed.prefill_s * 1e3,
            "decode_ms": timed.step_s.iter().map(|s| s * 1e3).collect::<Vec<_>>(),
        });
        // The record's small fields, then its two top-k lists row by row.
        let head = head.to_string();
        out.raw(if index == 0 { "\n  " } else { ",\n  " })?;
        out.raw(&head[..head.len() - 1])?;
        for (key, logits) in
            [("prompt_top_k", &with_logits.prompt_logits), ("generated_top_k", &with_logits.step_logits)]
        {
            out.raw(&format!(", {}: [", json!(key)))?;
            for (i, row) in logits.as_deref().unwrap_or_default().chunks_exact(model.vocab_size()).enumerate()
            {
                out.raw(if i == 0 { "\n    " } else { ",\n    " })?;
                write_top_k(out, row, args.top_k, tokenizer)?;
            }
            out.raw("]")?;
        }
        out.raw("}")?;
    }
    if let Some(mut out) = json_out {
        out.raw("\n]}\n")?;
        out.finish()?;
    }
    Ok(())
}

/// A JSON document written piece by piece to standard output.
struct JsonOut<W: std::io::Write> {
    out: std::io::BufWriter<W>,
}

impl<W: std::io::Write> JsonOut<W> {
    fn new(out: W) -> Self {
        JsonOut { out: std::io::BufWriter::new(out) }
    }

    fn raw(&mut self, text: &str) -> Result<()> {
        use std::io::Write;
        self.out.write_all(text.as_bytes()).map_err(|e| Error::io("cannot write", "standard output", e))
    }

    fn value(&mut self, value: &serde_json::Value) -> Result<()> {
        serde_json::to_writer(&mut self.out, value)
            .map_err(|e| Error::io("cannot write", "standard output", std::io::Error::other(e)))
    }

    fn finish(mut self) -> Result<()> {
        use std::io::Write;
        self.out.flush().map_err(|e| Error::io("cannot write", "standard output", e))
    }
}

fn embed(args: &EmbedArgs) -> Result<()> {
    let sentences = read_inputs(&args.sentence, &args.sentences)?;
    let (files, model, info) = build_with_scheme(&args.model, &args.build)?;
    let encoder = model.encoder("bench embed")?;
    let (limit, source) = files.encoder_limit(encoder.max_positions());
    let mut records = Vec::new();
    for sentence in &sentences {
        let mut ids = files.tokenizer.encode_with_special(sentence)?;
        if ids.len() > limit {
            eprintln!(
                "warning: an input of {} tokens was cut to {limit} ({source}), as sentence-transformers \
                 cuts it: {:?}",
                ids.len(),
                sentence.chars().take(60).collect::<String>()
            );
        }
        embedding::truncate_keeping_last(&mut ids, limit);
        let start = std::time::Instant::now();
        let outputs = embedding::encode_all(encoder, std::slice::from_ref(&ids), files.pad_id(), 1)?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        let vector = &outputs.embeddings[0];
        if args.json {
            records
                .push(json!({"sentence": sentence, "input_ids": ids, "encode_ms": ms, "embedding": vector}));
            continue;
        }
        let head: Vec<String> = vector.iter().take(8).map(|v| format!("{v:+.5}")).collect();
        println!("{sentence}");
        println!(
            "  [{} tokens, {:.2} ms, dim {}, scheme {}] {} …",
            ids.len(),
            ms,
            vector.len(),
            info.name,
            head.join(" ")
        );
    }
    if args.json {
        let doc = json!({"model": args.model, "scheme": info.name, "max_tokens": limit,
                         "max_tokens_source": source, "sentences": records});
        println!("{}", serde_json::to_string_pretty(&doc).expect("json serialises"));
    }
    Ok(())
}

fn profile(args: &ProfileArgs) -> Result<()> {
    let (files, model, info) = build_with_scheme(&args.model, &args.build)?;
    let vocab = match &model {
        Model::Causal(lm) => lm.vocab_size(),
        Model::Encoder(_) => files.tokenizer.vocab_size(),
    };
    let opts =
        ProfileOptions { batch: args.batch, tokens: args.tokens, decode: args.decode, repeats: args.repeats };
    let max_positions = files.max_positions().map_or(usize::MAX, |(n, _)| n);
    let report = tensor::on_pool(|| profile_model(&model, vocab, max_positions, opts))?;
    println!("{} · scheme {} · {} threads", args.model, info.name, tensor::threads());
    print!("{}", render(&report));
    Ok(())
}

/// The `k` most likely tokens of one logits row with their log-probabilities, as a JSON
/// array written entry by entry (the full vocabulary as one value took about 15 MB per
/// row).
fn write_top_k<W: std::io::Write>(
    out: &mut JsonOut<W>,
    row: &[f32],
    k: usize,
    tokenizer: &model::tokenizer::TextTokenizer,
) -> Result<()> {
    let mut logp = Vec::new();
    tensor::log_softmax(row, &mut logp);
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|&a, &b| logp[b].total_cmp(&logp[a]).then(a.cmp(&b)));
    out.raw("[")?;
    for (i, id) in order.into_iter().take(k).enumerate() {
        if i > 0 {
            out.raw(", ")?;
        }
        out.value(&json!({"id": id, "logprob": logp[id], "token": tokenizer.decode(&[id as u32])?}))?;
    }
    out.raw("]")
}
