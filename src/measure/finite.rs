//! Finds the first NaN or infinity in anything serialisable, with its key path
//! (`divergence.stats.ppl_ratio.value`): JSON cannot hold either, and serde_json would
//! write `null` in its place, which no reader of results.json accepts as a number.
//!
//! A serializer that writes nothing and only walks the value: every float is checked,
//! every struct field, sequence index and map key extends the path. Fields written
//! through their own representation (`f64_or_inf` writes infinity as the string `"inf"`)
//! are strings by then and pass.

use serde::ser::{self, Serialize};

/// The key path and value of the first non-finite float in `value`, if any.
pub fn first_non_finite<T: Serialize + ?Sized>(value: &T) -> Option<(String, f64)> {
    let mut walker = Walker { path: Vec::new(), found: None };
    // The walker's only error is "found one", which stops the walk early.
    let _ = value.serialize(&mut walker);
    walker.found
}

struct Walker {
    path: Vec<String>,
    found: Option<(String, f64)>,
}

impl Walker {
    fn path_text(&self) -> String {
        let mut text = String::new();
        for segment in &self.path {
            if !segment.starts_with('[') && !text.is_empty() {
                text.push('.');
            }
            text.push_str(segment);
        }
        text
    }

    fn float(&mut self, v: f64) -> Result<(), Found> {
        if v.is_finite() {
            return Ok(());
        }
        self.found = Some((self.path_text(), v));
        Err(Found)
    }

    fn nested<T: Serialize + ?Sized>(&mut self, segment: String, value: &T) -> Result<(), Found> {
        self.path.push(segment);
        value.serialize(&mut *self)?;
        self.path.pop();
        Ok(())
    }
}

/// Stops the walk at the first non-finite value.
#[derive(Debug)]
struct Found;

impl std::fmt::Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a non-finite value")
    }
}

impl std::error::Error for Found {}

impl ser::Error for Found {
    fn custom<T: std::fmt::Display>(_: T) -> Self {
        Found
    }
}

/// The text of a map key (keys in results.json are strings or numbers).
fn key_text<K: Serialize + ?Sized>(key: &K) -> String {
    match serde_json::to_value(key) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".to_string(),
    }
}

macro_rules! ignore {
    ($($name:ident: $ty:ty),* $(,)?) => {
        $(fn $name(self, _: $ty) -> Result<(), Found> { Ok(()) })*
    };
}

impl<'a> ser::Serializer for &'a mut Walker {
    type Ok = ();
    type Error = Found;
    type SerializeSeq = Compound<'a>;
    type SerializeTuple = Compound<'a>;
    type SerializeTupleStruct = Compound<'a>;
    type SerializeTupleVariant = Compound<'a>;
    type SerializeMap = Compound<'a>;
    type SerializeStruct = Compound<'a>;
    type SerializeStructVariant = Compound<'a>;

    ignore!(
        serialize_bool: bool, serialize_i8: i8, serialize_i16: i16, serialize_i32: i32,
        serialize_i64: i64, serialize_u8: u8, serialize_u16: u16, serialize_u32: u32,
        serialize_u64: u64, serialize_char: char, serialize_str: &str, serialize_bytes: &[u8],
        serialize_unit_struct: &'static str,
    );

    fn serialize_f32(self, v: f32) -> Result<(), Found> {
        self.float(v as f64)
    }

    fn serialize_f64(self, v: f64) -> Result<(), Found> {
        self.float(v)
    }

    fn serialize_none(self) -> Result<(), Found> {
        Ok(())
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Found> {
        value.serialize(self)
    }

    fn serialize_unit(self) -> Result<(), Found> {
        Ok(())
    }

    fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> Result<(), Found> {
        Ok(())
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<(), Found> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), Found> {
        self.nested(variant.to_string(), value)
    }

    fn serialize_seq(self, _: Option<usize>) -> Result<Compound<'a>, Found> {
        Ok(Compound { walker: self, index: 0, key: None })
    }

    fn serialize_tuple(self, len: usize) -> Result<Compound<'a>, Found> {
        self.serialize_seq(Some(len))
    }

    fn serialize_tuple_struct(self, _: &'static str, len: usize) -> Result<Compound<'a>, Found> {
        self.serialize_seq(Some(len))
    }

    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        len: usize,
    ) -> Result<Compound<'a>, Found> {
        self.serialize_seq(Some(len))
    }

    fn serialize_map(self, len: Option<usize>) -> Result<Compound<'a>, Found> {
        self.serialize_seq(len)
    }

    fn serialize_struct(self, _: &'static str, len: usize) -> Result<Compound<'a>, Found> {
        self.serialize_seq(Some(len))
    }

    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        len: usize,
    ) -> Result<Compound<'a>, Found> {
        self.serialize_seq(Some(len))
    }
}

/// A sequence, map or struct being walked: the next index, or the last map key.
struct Compound<'a> {
    walker: &'a mut Walker,
    index: usize,
    key: Option<String>,
}

impl Compound<'_> {
    fn element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Found> {
        let segment = format!("[{}]", self.index);
        self.index += 1;
        self.walker.nested(segment, value)
    }

    fn field<T: Serialize + ?Sized>(&mut self, name: &str, value: &T) -> Result<(), Found> {
        self.walker.nested(name.to_string(), value)
    }
}

macro_rules! sequence_like {
    ($($trait:ident :: $method:ident),*) => {
        $(impl ser::$trait for Compound<'_> {
            type Ok = ();
            type Error = Found;
            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Found> {
                self.element(value)
            }
            fn end(self) -> Result<(), Found> {
                Ok(())
            }
        })*
    };
}

sequence_like!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

macro_rules! struct_like {
    ($($trait:ident),*) => {
        $(impl ser::$trait for Compound<'_> {
            type Ok = ();
            type Error = Found;
            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                name: &'static str,
                value: &T,
            ) -> Result<(), Found> {
                self.field(name, value)
            }
            fn end(self) -> Result<(), Found> {
                Ok(())
            }
        })*
    };
}

struct_like!(SerializeStruct, SerializeStructVariant);

impl ser::SerializeMap for Compound<'_> {
    type Ok = ();
    type Error = Found;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Found> {
        self.key = Some(key_text(key));
        Ok(())
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Found> {
        let key = self.key.take().unwrap_or_default();
        self.field(&key, value)
    }

    fn end(self) -> Result<(), Found> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[derive(serde::Serialize)]
    struct Stats {
        mean: f64,
        counts: Vec<Option<f64>>,
        by_layer: BTreeMap<String, f32>,
        #[serde(with = "crate::measure::results::f64_or_inf")]
        sqnr_db: f64,
    }

    fn stats() -> Stats {
        Stats { mean: 1.0, counts: vec![Some(2.0), None], by_layer: BTreeMap::new(), sqnr_db: f64::INFINITY }
    }

    #[test]
    fn finite_values_and_infinity_written_as_text_pass() {
        assert_eq!(first_non_finite(&stats()), None);
    }

    #[test]
    fn a_nan_field_is_named_by_its_path() {
        let s = Stats { mean: f64::NAN, ..stats() };
        let (path, value) = first_non_finite(&s).unwrap();
        assert_eq!(path, "mean");
        assert!(value.is_nan());
    }

    #[test]
    fn sequence_indices_and_map_keys_extend_the_path() {
        let s = Stats { counts: vec![None, Some(f64::NEG_INFINITY)], ..stats() };
        assert_eq!(first_non_finite(&s), Some(("counts[1]".to_string(), f64::NEG_INFINITY)));
        let mut by_layer = BTreeMap::new();
        by_layer.insert("layers.0.q".to_string(), 1.0f32);
        by_layer.insert("layers.1.q".to_string(), f32::INFINITY);
        let s = Stats { by_layer, ..stats() };
        assert_eq!(first_non_finite(&s).unwrap().0, "by_layer.layers.1.q");
        let nested = vec![stats(), Stats { mean: f64::NAN, ..stats() }];
        assert_eq!(first_non_finite(&nested).unwrap().0, "[1].mean");
    }
}
