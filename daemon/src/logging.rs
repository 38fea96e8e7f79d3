//! Logs on stderr through tracing, as text or JSON lines, filtered with `EnvFilter` syntax.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tracing_subscriber::EnvFilter;

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl Serialize for LogFormat {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        crate::value_enum::serialize(self, serializer)
    }
}

impl<'de> Deserialize<'de> for LogFormat {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        crate::value_enum::deserialize(deserializer)
    }
}

/// Logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// The filter is not `EnvFilter` syntax.
    #[error("bad log filter \"{filter}\": {source}")]
    Filter {
        /// The filter as given.
        filter: String,
        /// The parser's reason.
        source: tracing_subscriber::filter::ParseError,
    },
    /// Another subscriber is installed already.
    #[error("logging is set up already")]
    Installed,
}

/// Installs the process's subscriber: events passing `filter` go to stderr in `format`.
pub fn init_logging(filter: &str, format: LogFormat) -> Result<(), LoggingError> {
    let env_filter = EnvFilter::try_new(filter).map_err(|source| LoggingError::Filter {
        filter: filter.to_owned(),
        source,
    })?;
    // Colours only for a person at a terminal: journald, a log file or a pipe would keep
    // the escape sequences as text (and NO_COLOR, https://no-color.org, turns them off).
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    }
    .map_err(|_| LoggingError::Installed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_read_and_write_their_flag_values() {
        #[derive(Debug, Serialize, Deserialize)]
        struct Options {
            log_format: LogFormat,
        }
        let text = toml::to_string(&Options {
            log_format: LogFormat::Json,
        })
        .unwrap();
        assert_eq!(text.trim(), "log_format = \"json\"");
        let options: Options = toml::from_str("log_format = \"text\"").unwrap();
        assert_eq!(options.log_format, LogFormat::Text);
        let error = toml::from_str::<Options>("log_format = \"xml\"").unwrap_err();
        assert!(
            error
                .message()
                .contains("\"xml\" is neither \"text\" nor \"json\""),
            "{error}"
        );
    }

    #[test]
    fn bad_filters_are_refused() {
        let error = init_logging("info,=[", LogFormat::Text).unwrap_err();
        assert!(error.to_string().starts_with("bad log filter"), "{error}");
    }
}
