//! serde for clap's `ValueEnum`s: a variant is its flag value in the file too. Use with
//! `#[serde(with = "daemon::value_enum")]`.

use std::fmt::Write as _;

use clap::ValueEnum;
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serializer};

/// Writes the variant's flag value.
pub fn serialize<T: ValueEnum, S: Serializer>(value: &T, serializer: S) -> Result<S::Ok, S::Error> {
    match value.to_possible_value() {
        Some(possible) => serializer.serialize_str(possible.get_name()),
        None => Err(serde::ser::Error::custom("a skipped variant has no name")),
    }
}

/// Reads a flag value; anything else is refused naming the accepted values.
pub fn deserialize<'de, T: ValueEnum, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<T, D::Error> {
    let text = String::deserialize(deserializer)?;
    T::from_str(&text, false).map_err(|_| de::Error::custom(not_one_of::<T>(&text)))
}

/// `"xml" is neither "text" nor "json"`, or `... is not one of "a", "b", "c"`.
pub(crate) fn not_one_of<T: ValueEnum>(text: &str) -> String {
    let names: Vec<String> = T::value_variants()
        .iter()
        .filter_map(|variant| variant.to_possible_value())
        .map(|possible| format!("\"{}\"", possible.get_name()))
        .collect();
    let mut message = format!("\"{text}\" ");
    match names.as_slice() {
        [one, other] => {
            let _ = write!(message, "is neither {one} nor {other}");
        }
        _ => {
            let _ = write!(message, "is not one of {}", names.join(", "));
        }
    }
    message
}
