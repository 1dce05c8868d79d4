//! The one error type of the core. Being throttled is never an error (see `decision.rs`);
//! these are bad arguments and unknown handles, raised as `kiln.CoreError` (a `ValueError`).

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CoreError {
    /// An argument is out of range or malformed; the message names it and what was expected.
    #[error("{name}: {problem}")]
    BadArgument { name: &'static str, problem: String },
    /// A handle that this engine never issued.
    #[error("unknown {kind} handle {handle}")]
    UnknownHandle { kind: &'static str, handle: u64 },
    /// A name that this engine does not know (pool, ip).
    #[error("unknown {kind} {name:?}")]
    UnknownName { kind: &'static str, name: String },
    /// A computation that would not fit its integer type.
    #[error("{what} overflows")]
    Overflow { what: &'static str },
}

impl CoreError {
    pub fn bad(name: &'static str, problem: impl Into<String>) -> Self {
        Self::BadArgument {
            name,
            problem: problem.into(),
        }
    }
}

pub type CoreResult<T> = Result<T, CoreError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_argument() {
        let e = CoreError::bad("max_burst", "must be at least 1, got 0");
        assert_eq!(e.to_string(), "max_burst: must be at least 1, got 0");
        let e = CoreError::UnknownHandle {
            kind: "key",
            handle: 7,
        };
        assert_eq!(e.to_string(), "unknown key handle 7");
        let e = CoreError::Overflow {
            what: "rate interval",
        };
        assert_eq!(e.to_string(), "rate interval overflows");
    }
}
