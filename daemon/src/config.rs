//! One configuration type, four layers. A daemon's options are one struct deriving clap's
//! `Args` (with `env`, and the defaults) and serde's `Serialize` + `Deserialize`
//! (`deny_unknown_fields`, for the TOML file); each field's clap id equals its file key.
//!
//! Precedence, highest first: command-line flags, environment variables, the TOML file,
//! defaults. clap resolves the first two and the defaults; [`CommandLine::merge`] puts the
//! file under what the command line and environment set explicitly. A list from a flag or
//! the environment replaces the file's list.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgMatches, Parser};
use serde::Serialize;
use serde::de::{self, DeserializeOwned, Visitor};

/// Parses the process's arguments (and environment) into `C`, keeping clap's matches, which
/// say where every value came from.
pub fn parse<C: Parser>() -> Result<(C, ArgMatches), clap::Error> {
    parse_from(std::env::args_os())
}

/// [`parse`] for the given arguments (the first is the program name).
pub fn parse_from<C, I, T>(args: I) -> Result<(C, ArgMatches), clap::Error>
where
    C: Parser,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut command = C::command();
    let matches = command.try_get_matches_from_mut(args)?;
    let parsed = C::from_arg_matches(&matches).map_err(|error| error.format(&mut command))?;
    Ok((parsed, matches))
}

/// The options as clap parsed them (flags over environment over defaults), and which of
/// them the command line or the environment set.
#[derive(Debug, Clone)]
pub struct CommandLine<T> {
    options: T,
    explicit: BTreeSet<String>,
}

impl<T> CommandLine<T> {
    /// `options` parsed from `matches`.
    pub fn new(options: T, matches: &ArgMatches) -> Self {
        let explicit = matches
            .ids()
            .filter(|id| {
                matches!(
                    matches.value_source(id.as_str()),
                    Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                )
            })
            .map(|id| id.as_str().to_owned())
            .collect();
        Self { options, explicit }
    }

    /// The options without a file: flags over environment over defaults.
    pub fn options(&self) -> &T {
        &self.options
    }

    /// Whether a flag or an environment variable set `key`, which the file cannot change.
    pub fn is_explicit(&self, key: &str) -> bool {
        self.explicit.contains(key)
    }
}

impl<T: Serialize + DeserializeOwned + Clone> CommandLine<T> {
    /// Reads the TOML file at `path`, if any, and [`merges`](Self::merge) it.
    pub fn load(&self, path: Option<&Path>) -> Result<T, FileError> {
        let Some(path) = path else {
            return Ok(self.options.clone());
        };
        let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
            path: path.to_owned(),
            source,
        })?;
        self.merge(path, &text)
    }

    /// Puts the TOML `text` of the file `path` under the command line: a key of the file
    /// wins over a default and loses to a flag or environment variable. Every error names
    /// the file and the line or the key.
    pub fn merge(&self, path: &Path, text: &str) -> Result<T, FileError> {
        let file: toml::Table = text.parse().map_err(|error: toml::de::Error| {
            let line = error.span().map_or(1, |span| {
                text[..span.start.min(text.len())].matches('\n').count() + 1
            });
            FileError::Syntax {
                path: path.to_owned(),
                line,
                message: one_line(error.message()),
            }
        })?;
        let known = field_names::<T>();
        if let Some(key) = file.keys().find(|key| !known.contains(&key.as_str())) {
            return Err(FileError::UnknownKey {
                path: path.to_owned(),
                key: key.clone(),
            });
        }
        let base = toml::Table::try_from(&self.options).map_err(|error| FileError::Encode {
            message: error.to_string(),
        })?;
        // Every key of the file must be usable, even one a flag overrides: a broken file
        // fails now rather than when the flag goes away.
        let mut whole_file = base.clone();
        whole_file.extend(file.clone());
        if let Err(error) = whole_file.try_into::<T>() {
            return Err(self.blame(path, &base, &file, &error));
        }
        let mut merged = base;
        merged.extend(file.into_iter().filter(|(key, _)| !self.is_explicit(key)));
        merged
            .try_into()
            .map_err(|error: toml::de::Error| FileError::Invalid {
                path: path.to_owned(),
                message: one_line(error.message()),
            })
    }

    /// serde stops at the first bad value without naming it (toml keeps the key to itself):
    /// find the key by trying the file's keys one at a time.
    fn blame(
        &self,
        path: &Path,
        base: &toml::Table,
        file: &toml::Table,
        error: &toml::de::Error,
    ) -> FileError {
        let key = file.iter().find(|(key, value)| {
            let mut one = base.clone();
            one.insert((*key).clone(), (*value).clone());
            one.try_into::<T>().is_err()
        });
        match key {
            Some((key, _)) => FileError::Key {
                path: path.to_owned(),
                key: key.clone(),
                reason: one_line(error.message()),
            },
            None => FileError::Invalid {
                path: path.to_owned(),
                message: one_line(error.message()),
            },
        }
    }
}

/// `value` as a TOML document (`--print-config`); redact secrets before.
pub fn to_toml<T: Serialize>(value: &T) -> Result<String, FileError> {
    toml::to_string(value).map_err(|error| FileError::Encode {
        message: error.to_string(),
    })
}

/// A configuration file the daemon cannot use. Each message is one line naming the file and
/// the line or the key.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file could not be read.
    #[error("config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config file {}: line {line}: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// The parser's message.
        message: String,
    },
    /// A key of the file holds an unusable value.
    #[error("config file {}: key \"{key}\": {reason}", path.display())]
    Key {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// Why the value is refused.
        reason: String,
    },
    /// The file has a key this daemon does not know (a typo, most likely).
    #[error("config file {}: unknown key \"{key}\"", path.display())]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// The file's keys do not fit together (no single key is to blame).
    #[error("config file {}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The deserializer's message.
        message: String,
    },
    /// The options cannot be written as TOML (a bug in the options type).
    #[error("cannot write the configuration as TOML: {message}")]
    Encode {
        /// The serializer's message.
        message: String,
    },
}

fn one_line(message: &str) -> String {
    message
        .trim()
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The keys `T` reads (its serde field names), learnt by asking it to deserialize itself
/// from a deserializer that only records the field list.
fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(FieldNames(&mut fields));
    fields
}

struct FieldNames<'a>(&'a mut &'static [&'static str]);

impl<'de> de::Deserializer<'de> for FieldNames<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(de::Error::custom("field names recorded"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;
    use crate::PortRange;

    /// Options of a small daemon.
    #[derive(Debug, Clone, PartialEq, Parser, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Options {
        /// A name.
        #[arg(long, default_value = "default")]
        name: String,
        /// Ports.
        #[arg(long, default_value = "1000-2000")]
        ports: PortRange,
        /// Items (repeatable).
        #[arg(long = "item")]
        items: Vec<String>,
        /// An optional number.
        #[arg(long)]
        limit: Option<u32>,
        /// A switch.
        #[arg(long)]
        verbose: bool,
    }

    fn command_line(args: &[&str]) -> CommandLine<Options> {
        let (options, matches) =
            parse_from::<Options, _, _>(std::iter::once("test").chain(args.iter().copied()))
                .unwrap();
        CommandLine::new(options, &matches)
    }

    fn merge(args: &[&str], text: &str) -> Result<Options, FileError> {
        command_line(args).merge(Path::new("x.toml"), text)
    }

    #[test]
    fn file_over_defaults_flags_over_file() {
        let text = "name = \"file\"\nitems = [\"a\", \"b\"]\nlimit = 3\nverbose = true\n";
        let options = merge(&[], text).unwrap();
        assert_eq!(options.name, "file");
        assert_eq!(options.items, ["a", "b"]);
        assert_eq!(options.limit, Some(3));
        assert!(options.verbose);
        assert_eq!(options.ports, "1000-2000".parse().unwrap());

        let options = merge(&["--name", "flag", "--item", "c"], text).unwrap();
        assert_eq!(options.name, "flag");
        // A list from the command line replaces the file's.
        assert_eq!(options.items, ["c"]);
        assert_eq!(options.limit, Some(3));

        let options = merge(&["--limit", "4"], "").unwrap();
        assert_eq!(options.limit, Some(4));
        assert_eq!(options, command_line(&["--limit", "4"]).load(None).unwrap());
    }

    #[test]
    fn errors_name_the_file_and_the_line_or_key() {
        let error = merge(&[], "name = \"a\"\nports = ").unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("config file x.toml: line 2: "),
            "{error}"
        );
        assert!(!error.to_string().contains('\n'), "{error}");
        assert_eq!(
            merge(&[], "nmae = \"a\"").unwrap_err().to_string(),
            "config file x.toml: unknown key \"nmae\""
        );
        assert_eq!(
            merge(&[], "name = \"a\"\nports = \"1-70000\"")
                .unwrap_err()
                .to_string(),
            "config file x.toml: key \"ports\": 70000 is not a port"
        );
        let error = merge(&[], "limit = -1").unwrap_err().to_string();
        assert!(
            error.starts_with("config file x.toml: key \"limit\": ") && error.contains("-1"),
            "{error}"
        );
        // A bad value is refused even where the command line overrides it.
        assert!(merge(&["--limit", "1"], "limit = -1").is_err());
        let error = command_line(&[])
            .load(Some(Path::new("/nonexistent/x.toml")))
            .unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("config file /nonexistent/x.toml: "),
            "{error}"
        );
    }

    #[test]
    fn printed_options_read_back() {
        let options = command_line(&["--item", "a", "--limit", "2"])
            .options()
            .clone();
        let text = to_toml(&options).unwrap();
        assert_eq!(merge(&[], &text).unwrap(), options);
        assert_eq!(
            field_names::<Options>(),
            ["name", "ports", "items", "limit", "verbose"]
        );
    }
}
