//! `dump.json`: the saved list of apps, for `save` and `resurrect`.

use std::fs;
use std::io;
use std::path::Path;

use corral_proto::AppSpec;
use serde::{Deserialize, Serialize};

use crate::home::write_atomically;

const DUMP_VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct Dump {
    version: u32,
    apps: Vec<AppSpec>,
}

/// Why the dump could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// Refused: an empty list would replace a dump that lists apps.
    #[error(
        "not saving: no app is running, and {path} lists {count} app(s) that an empty list would \
         replace. Start the apps first (`corral resurrect`), or run `corral save --force` to save \
         the empty list"
    )]
    WouldEmpty {
        /// The dump.
        path: String,
        /// Apps it lists.
        count: usize,
    },
    /// No dump yet.
    #[error("there is no saved app list at {0}: run `corral save` first")]
    Missing(String),
    /// The dump does not parse.
    #[error("{path} is not a valid app list: {source}. Fix or delete it")]
    Invalid {
        /// The dump.
        path: String,
        /// The parse error, with line and column.
        source: serde_json::Error,
    },
    /// Reading or writing failed.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: io::Error,
    },
}

/// Writes `apps` to `path` atomically; keeps the previous dump as `<path>.bak`.
pub fn save(path: &Path, apps: Vec<AppSpec>, force: bool) -> Result<usize, DumpError> {
    let shown = path.display().to_string();
    if apps.is_empty() && !force {
        match load(path) {
            Ok(previous) if !previous.is_empty() => {
                return Err(DumpError::WouldEmpty {
                    path: shown,
                    count: previous.len(),
                });
            }
            _ => {}
        }
    }
    let count = apps.len();
    let mut bytes = serde_json::to_vec_pretty(&Dump {
        version: DUMP_VERSION,
        apps,
    })
    .expect("specs serialize");
    bytes.push(b'\n');
    let io_error = |source| DumpError::Io {
        path: shown.clone(),
        source,
    };
    if path.exists() {
        fs::copy(path, path.with_extension("json.bak")).map_err(io_error)?;
    }
    write_atomically(path, &bytes).map_err(io_error)?;
    Ok(count)
}

/// Reads the apps of the dump at `path`.
pub fn load(path: &Path) -> Result<Vec<AppSpec>, DumpError> {
    let shown = path.display().to_string();
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(DumpError::Missing(shown)),
        Err(source) => {
            return Err(DumpError::Io {
                path: shown,
                source,
            });
        }
    };
    let dump: Dump = serde_json::from_slice(&bytes).map_err(|source| DumpError::Invalid {
        path: shown,
        source,
    })?;
    Ok(dump.apps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn spec(name: &str) -> AppSpec {
        AppSpec::new(name.into(), PathBuf::from("/bin/true"), PathBuf::from("/"))
    }

    #[test]
    fn an_empty_list_does_not_replace_a_good_dump_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dump.json");
        assert_eq!(save(&path, vec![spec("a"), spec("b")], false).unwrap(), 2);
        let err = save(&path, vec![], false).unwrap_err().to_string();
        assert!(
            err.contains("lists 2 app(s)") && err.contains("--force"),
            "{err}"
        );
        assert_eq!(load(&path).unwrap().len(), 2);
        save(&path, vec![], true).unwrap();
        assert!(load(&path).unwrap().is_empty());
        assert_eq!(load(&path.with_extension("json.bak")).unwrap().len(), 2);
    }

    #[test]
    fn explains_a_missing_or_broken_dump() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dump.json");
        assert!(matches!(load(&path), Err(DumpError::Missing(_))));
        fs::write(&path, "{not json").unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(
            err.contains("not a valid app list") && err.contains("line 1"),
            "{err}"
        );
    }
}
