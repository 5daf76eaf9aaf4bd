//! Accepted models on disk, `state.dir/models/{key}.json`: written to a temporary file, fsynced and
//! renamed (a crash leaves the old file or the new one, never half of one), and read back at start
//! so a restart while the uplink is down still runs them.

use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Where the models of an agent with `state_dir` live.
pub(crate) fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("models")
}

/// Whether `key` can name a file (a model key from a topic: `[A-Za-z0-9_-]`, at most 64 bytes).
pub(crate) fn is_valid_key(key: &str) -> bool {
    edgewatch_models::wire::is_valid_node_id(key)
}

/// Stores `payload` (an accepted model) as `dir/{key}.json`, replacing the previous one atomically.
pub(crate) fn save(dir: &Path, key: &str, payload: &[u8]) -> std::io::Result<()> {
    if !is_valid_key(key) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("model key {key:?} cannot name a file"),
        ));
    }
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{key}.json.tmp"));
    let path = dir.join(format!("{key}.json"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(payload)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    // The rename itself is durable once the directory is synced (not possible on every platform).
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Every `dir/{key}.json`, sorted by key, with its bytes or the error reading it. A missing
/// directory holds nothing; temporary files of an interrupted save are ignored.
pub(crate) fn load_all(dir: &Path) -> std::io::Result<Vec<(String, std::io::Result<Vec<u8>>)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let key = match (path.file_stem(), path.extension()) {
            (Some(stem), Some(ext)) if ext == "json" => stem.to_string_lossy().into_owned(),
            _ => continue,
        };
        out.push((key, std::fs::read(&path)));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_models_load_back_and_replace_older_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let d = dir(tmp.path());
        assert!(load_all(&d).unwrap().is_empty(), "no directory yet");
        save(&d, "pca-b", b"one").unwrap();
        save(&d, "pca-a", b"two").unwrap();
        save(&d, "pca-b", b"three").unwrap();
        std::fs::write(d.join("pca-c.json.tmp"), b"half").unwrap();
        let all = load_all(&d).unwrap();
        let got: Vec<(String, Vec<u8>)> = all.into_iter().map(|(k, b)| (k, b.unwrap())).collect();
        assert_eq!(
            got,
            vec![
                ("pca-a".to_string(), b"two".to_vec()),
                ("pca-b".to_string(), b"three".to_vec())
            ]
        );
    }

    #[test]
    fn keys_that_are_not_file_names_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        for key in ["", "../x", "a/b", "a.b", &"k".repeat(65)] {
            assert!(save(tmp.path(), key, b"x").is_err(), "{key:?}");
        }
        assert!(std::fs::read_dir(tmp.path()).unwrap().next().is_none());
    }
}
