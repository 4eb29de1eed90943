//! How a command prints what it answers: lines for people (the default), or `--output json` for scripts (one
//! pretty-printed JSON document on stdout, the same shape the HTTP API answers).

use serde::Serialize;

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Output {
    #[default]
    Text,
    Json,
}

impl Output {
    /// Prints `value` as JSON, or runs `text` to print it for people.
    pub fn print<T: Serialize>(self, value: &T, text: impl FnOnce(&T)) -> anyhow::Result<()> {
        match self {
            Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
            Output::Text => text(value),
        }
        Ok(())
    }
}
