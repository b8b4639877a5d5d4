//! The crate's error type for everything outside the tensor kernels.
//!
//! Tensor-level code (the FWHT op, the layers) returns [`candle_core::Result`] like the rest of
//! candle, so it composes with candle modules. The parts a user drives directly (data loading,
//! checkpoints, training, evaluation, the command line) return [`Error`], whose messages say what
//! went wrong and what to do about it.

use std::path::PathBuf;

/// Everything that can go wrong in `whvi` outside the tensor kernels.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error from a candle tensor operation.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A data file exists but its content is not what the format requires.
    #[error("{}: {message}", path.display())]
    Data {
        /// The offending file.
        path: PathBuf,
        /// What is wrong and what to do about it.
        message: String,
    },
    /// A checkpoint file is missing, damaged or does not match what was asked of it.
    #[error("checkpoint {}: {message}", path.display())]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong and what to do about it.
        message: String,
    },
    /// An argument or configuration value is invalid.
    #[error("{0}")]
    InvalidArgument(String),
    /// Training diverged (NaN or infinite loss).
    #[error("{0}")]
    Diverged(String),
    /// The run was interrupted (Ctrl-C) after its state was saved.
    #[error("interrupted: {0}")]
    Interrupted(String),
}

impl Error {
    /// The same error without the backtraces candle attaches when `RUST_BACKTRACE` is set,
    /// for a message meant for a user rather than a debugger.
    pub fn without_backtrace(self) -> Self {
        fn strip(e: candle_core::Error) -> candle_core::Error {
            use candle_core::Error as E;
            match e {
                E::WithBacktrace { inner, .. } => strip(*inner),
                E::Context { inner, context } => E::Context {
                    inner: Box::new(strip(*inner)),
                    context,
                },
                E::WithPath { inner, path } => E::WithPath {
                    inner: Box::new(strip(*inner)),
                    path,
                },
                other => other,
            }
        }
        match self {
            Error::Candle(e) => Error::Candle(strip(e)),
            other => other,
        }
    }

    /// A candle error's message without candle's backtraces, to embed in another message.
    pub fn candle_message(e: candle_core::Error) -> String {
        Error::Candle(e).without_backtrace().to_string()
    }

    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A data-format error about `path`.
    pub fn data(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Data {
            path: path.into(),
            message: message.into(),
        }
    }

    /// A checkpoint error about `path`.
    pub fn checkpoint(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            message: message.into(),
        }
    }

    /// An invalid argument or configuration value.
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidArgument(message.into())
    }
}

/// Result with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_for_the_user_carries_no_backtrace() {
        let inner = candle_core::Error::Msg("shape mismatch in matmul".into());
        let traced = candle_core::Error::WithBacktrace {
            inner: Box::new(inner),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        }
        .context("layer fc1");
        let with = Error::Candle(traced).to_string();
        assert!(
            with.contains("backtrace") || with.lines().count() > 2,
            "{with}"
        );
        let traced = candle_core::Error::WithBacktrace {
            inner: Box::new(candle_core::Error::Msg("shape mismatch in matmul".into())),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        }
        .context("layer fc1");
        let shown = Error::Candle(traced).without_backtrace().to_string();
        assert_eq!(shown, "layer fc1\nshape mismatch in matmul");
    }
}
