//! The content-addressed handler store.
//!
//! Workers never `dlopen` a file under `target/`: copying over a mapped
//! library crashes every process using it. Each handler build is copied into
//! `<run dir>/store/<sha256>.so` (temp file, fsync, rename, mode 0444) and
//! workers load only those paths. A version is the hash of the bytes, so one
//! reload loads the same bytes in every worker even if the source file
//! changes meanwhile. Beside each library, `<sha256>.json` keeps what people
//! want to know about it: label, source, size, when it was added, and the
//! name and version the handler reports once it has run.
//!
//! Integrity: an entry is trusted only once its bytes hash to its name (an
//! existing entry is re-read on import and rewritten if it does not match,
//! and the worker checks the bytes again through the descriptor it loads
//! from); the store and the run directory above it must belong to root or
//! the host's user (see [`crate::trust`]). Metadata changes (labels, gc) run
//! under an exclusive lock on `<store>/.lock`, and labels are unique.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::trust::{self, Owners};

/// One handler build in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// Hex sha256 of the library bytes.
    pub hash: String,
    /// The read-only copy workers load.
    pub path: PathBuf,
    /// Where the bytes were taken from.
    pub source: PathBuf,
}

impl Version {
    /// The first 12 hex digits, as shown to people.
    pub fn short(&self) -> &str {
        short(&self.hash)
    }
}

/// The first 12 hex digits of a hash.
pub fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// What the store knows about a version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// Hex sha256.
    pub hash: String,
    /// A name given at deploy.
    pub label: Option<String>,
    /// The file it was copied from.
    pub source: PathBuf,
    /// Bytes.
    pub size: u64,
    /// Seconds since the epoch when it entered the store.
    pub added: u64,
    /// `name version` as the handler reports itself, once it has run.
    pub handler: Option<String>,
}

/// The store directory.
#[derive(Debug, Clone)]
pub struct HandlerStore {
    dir: PathBuf,
    owners: Owners,
}

/// Held while the store's metadata is read and changed.
pub struct StoreLock {
    _flock: nix::fcntl::Flock<fs::File>,
}

impl HandlerStore {
    /// Opens (creating if needed) the store at `dir`, owner-only, after
    /// checking that it and everything in it belongs to `owners`.
    pub fn open(dir: &Path, owners: Owners) -> Result<HandlerStore> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create the handler store {}", dir.display()))?;
        trust::check_tree(dir, owners).context("refusing to use the handler store")?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot restrict the handler store {}", dir.display()))?;
        Ok(HandlerStore {
            dir: dir.to_owned(),
            owners,
        })
    }

    /// Locks the store's metadata against other `host` processes until the
    /// lock is dropped.
    pub fn lock(&self) -> Result<StoreLock> {
        let path = self.dir.join(".lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map(|flock| StoreLock { _flock: flock })
            .map_err(|(_, e)| anyhow::anyhow!("cannot lock {}: {e}", path.display()))
    }

    /// Snapshots `source` into the store and returns its version.
    ///
    /// Refused: a file that a user other than root or the host's own could
    /// change, or that sits below a directory they could change (loading it
    /// runs their code), unless `allow_writable`; anything that is not a
    /// complete shared library; a label that is invalid or names another
    /// version, or a new label for a version that already has one.
    pub fn import(
        &self,
        source: &Path,
        label: Option<&str>,
        allow_writable: bool,
    ) -> Result<Arc<Version>> {
        if let Some(label) = label {
            check_label(label)?;
        }
        fs::metadata(source).with_context(|| format!("handler {}", source.display()))?;
        let read_from = if allow_writable {
            source.to_owned()
        } else {
            trust::check_path(source, self.owners).with_context(|| {
                format!(
                    "refusing to load handler {} (fix the owner or mode, or set allow_writable_handler = true)",
                    source.display()
                )
            })?
        };
        let bytes = fs::read(&read_from)
            .with_context(|| format!("cannot read handler {}", source.display()))?;
        check_shared_library(&bytes).with_context(|| format!("handler {}", source.display()))?;
        let hash = hash_bytes(&bytes);
        let path = self.library(&hash);
        let _lock = self.lock()?;
        if !self.holds(&hash, &bytes) {
            self.write_atomically(&path, &bytes)
                .with_context(|| format!("cannot store handler {}", source.display()))?;
        }
        let mut info = self.info(&hash).unwrap_or_else(|| VersionInfo {
            hash: hash.clone(),
            label: None,
            source: source.to_owned(),
            size: bytes.len() as u64,
            added: now(),
            handler: None,
        });
        if let Some(label) = label {
            self.check_label_free(label, &info)?;
            info.label = Some(label.to_owned());
        }
        self.save_info(&info)?;
        Ok(Arc::new(Version {
            hash,
            path,
            source: source.to_owned(),
        }))
    }

    /// Whether the entry named `hash` holds exactly `bytes` (whose hash it
    /// is): compared, not hashed again. An entry that differs is reported
    /// (it is then rewritten).
    fn holds(&self, hash: &str, bytes: &[u8]) -> bool {
        let path = self.library(hash);
        let Ok(stored) = fs::read(&path) else {
            return false;
        };
        if stored != bytes {
            tracing::warn!(
                path = %path.display(),
                "store entry does not match its name (corrupted or tampered with); replacing it"
            );
            return false;
        }
        true
    }

    /// Refuses a label that another version has, or a second label for one.
    fn check_label_free(&self, label: &str, info: &VersionInfo) -> Result<()> {
        if let Some(other) = self
            .list()?
            .into_iter()
            .find(|v| v.label.as_deref() == Some(label) && v.hash != info.hash)
        {
            bail!(
                "label {label:?} already names version {}; labels are unique (pick another, or `host gc --labelled` the old one)",
                short(&other.hash)
            );
        }
        match &info.label {
            Some(existing) if existing != label => bail!(
                "version {} is already labelled {existing:?}; a version keeps the label it was first deployed with",
                short(&info.hash)
            ),
            _ => Ok(()),
        }
    }

    /// The stored version with this exact hash.
    pub fn get(&self, hash: &str) -> Result<Arc<Version>> {
        let path = self.library(hash);
        if !path.exists() {
            bail!(
                "version {} is not in the store {}",
                short(hash),
                self.dir.display()
            );
        }
        let source = self
            .info(hash)
            .map(|i| i.source)
            .unwrap_or_else(|| path.clone());
        Ok(Arc::new(Version {
            hash: hash.to_owned(),
            path,
            source,
        }))
    }

    /// Finds a version by label or unique hash prefix (at least 4 digits);
    /// a name that could mean more than one version is an error that lists
    /// them.
    pub fn resolve(&self, spec: &str) -> Result<String> {
        let versions = self.list()?;
        let lower = spec.to_ascii_lowercase();
        let mut candidates: Vec<&VersionInfo> = versions
            .iter()
            .filter(|v| {
                v.label.as_deref() == Some(spec) || (lower.len() >= 4 && v.hash.starts_with(&lower))
            })
            .collect();
        candidates.dedup_by(|a, b| a.hash == b.hash);
        match candidates.as_slice() {
            [one] => Ok(one.hash.clone()),
            [] if lower.len() < 4 && versions.iter().any(|v| v.hash.starts_with(&lower)) => {
                bail!("{spec:?} is too short: give at least 4 hex digits or a label")
            }
            [] => bail!("no version has the label or hash prefix {spec:?} (see `host versions`)"),
            many => bail!(
                "{spec:?} could mean {} versions: {}; give more hex digits or a label",
                many.len(),
                many.iter()
                    .map(|v| match &v.label {
                        Some(label) => format!("{} (label {label})", short(&v.hash)),
                        None => short(&v.hash).to_owned(),
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// Every version, oldest first.
    pub fn list(&self) -> Result<Vec<VersionInfo>> {
        let mut versions = Vec::new();
        for entry in fs::read_dir(&self.dir)
            .with_context(|| format!("cannot read {}", self.dir.display()))?
        {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "so") {
                if let Some(hash) = path.file_stem().and_then(|s| s.to_str()) {
                    versions.push(self.info(hash).unwrap_or_else(|| VersionInfo {
                        hash: hash.to_owned(),
                        label: None,
                        source: path.clone(),
                        size: fs::metadata(&path).map_or(0, |m| m.len()),
                        added: 0,
                        handler: None,
                    }));
                }
            }
        }
        versions.sort_by(|a, b| (a.added, &a.hash).cmp(&(b.added, &b.hash)));
        Ok(versions)
    }

    /// Records how the handler describes itself.
    pub fn record_handler(&self, hash: &str, handler: &str) -> Result<()> {
        let _lock = self.lock()?;
        if let Some(mut info) = self.info(hash) {
            if info.handler.as_deref() != Some(handler) {
                info.handler = Some(handler.to_owned());
                self.save_info(&info)?;
            }
        }
        Ok(())
    }

    /// Deletes a version (its library and its metadata); the caller holds
    /// the store's lock.
    pub fn remove(&self, hash: &str) -> Result<()> {
        fs::remove_file(self.library(hash))
            .with_context(|| format!("cannot remove version {}", short(hash)))?;
        let _ = fs::remove_file(self.dir.join(format!("{hash}.json")));
        Ok(())
    }

    fn library(&self, hash: &str) -> PathBuf {
        self.dir.join(format!("{hash}.so"))
    }

    fn info(&self, hash: &str) -> Option<VersionInfo> {
        let text = fs::read_to_string(self.dir.join(format!("{hash}.json"))).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn save_info(&self, info: &VersionInfo) -> Result<()> {
        let text = serde_json::to_vec_pretty(info)?;
        let path = self.dir.join(format!("{}.json", info.hash));
        let temp = self
            .dir
            .join(format!(".meta-{}-{}", std::process::id(), unique()));
        fs::write(&temp, text)
            .and_then(|()| fs::rename(&temp, &path))
            .with_context(|| format!("cannot write {}", path.display()))
    }

    fn write_atomically(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let temp = self
            .dir
            .join(format!(".incoming-{}-{}", std::process::id(), unique()));
        let result = (|| {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&temp)?;
            file.write_all(bytes)?;
            file.set_permissions(fs::Permissions::from_mode(0o444))?;
            file.sync_all()?;
            fs::rename(&temp, path)?;
            fs::File::open(&self.dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        Ok(result?)
    }
}

/// The version of these bytes: their sha256 in lower-case hex.
pub fn hash_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// A label names one version in commands, so it must read as a name: 1 to
/// 64 of `A-Z a-z 0-9 . _ -`, not starting with `-`, and not only hex
/// digits (that would read as a hash prefix).
fn check_label(label: &str) -> Result<()> {
    let valid_chars = label
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if label.is_empty() || label.len() > 64 || !valid_chars || label.starts_with('-') {
        bail!("label {label:?} is not valid: use 1 to 64 letters, digits, '.', '_' or '-' (not starting with '-')");
    }
    if label.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("label {label:?} is only hex digits, so it would read as a hash prefix: add a letter beyond f (e.g. \"v{label}\")");
    }
    Ok(())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Refuses what cannot be a complete 64-bit ELF shared library, before a
/// worker maps it: a truncated library crashes the process that loads it
/// (SIGBUS) instead of failing with an error.
fn check_shared_library(bytes: &[u8]) -> Result<()> {
    const ET_DYN: u16 = 3;
    if bytes.is_empty() {
        anyhow::bail!("is empty");
    }
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" {
        anyhow::bail!("is not a shared library (no ELF header)");
    }
    if bytes[4] != 2 || bytes[5] != 1 {
        anyhow::bail!("is not a 64-bit little-endian ELF file");
    }
    let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    if u16_at(16) != ET_DYN {
        anyhow::bail!("is an ELF file but not a shared library");
    }
    let section_headers_end = u64_at(40) + u64::from(u16_at(58)) * u64::from(u16_at(60));
    if section_headers_end > bytes.len() as u64 {
        anyhow::bail!(
            "is truncated ({} bytes, its headers say at least {}); is it still being written?",
            bytes.len(),
            section_headers_end
        );
    }
    Ok(())
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Lower-case hex.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF shared-library header followed by `tail`.
    fn fake_library(tail: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0u8; 64];
        bytes[..4].copy_from_slice(b"\x7fELF");
        bytes[4] = 2;
        bytes[5] = 1;
        bytes[16] = 3;
        bytes.extend_from_slice(tail);
        bytes
    }

    #[test]
    fn non_libraries_and_truncated_libraries_are_refused() {
        assert!(check_shared_library(&fake_library(b"")).is_ok());
        let text = check_shared_library(b"#!/bin/sh\necho hi\n").unwrap_err();
        assert!(text.to_string().contains("not a shared library"));
        let mut truncated = fake_library(b"");
        truncated[40] = 200; // section headers at offset 200...
        truncated[58] = 64; // ...of 64 bytes each...
        truncated[60] = 2; // ...two of them: past the end of the file.
        let error = check_shared_library(&truncated).unwrap_err();
        assert!(error.to_string().contains("is truncated"), "{error}");
    }

    #[test]
    fn same_bytes_same_version_and_read_only_copy() {
        let dir = std::env::temp_dir().join(format!("host-store-test-{}", std::process::id()));
        let store = HandlerStore::open(&dir.join("store"), Owners::current()).unwrap();
        let source = dir.join("lib.so");
        fs::write(&source, fake_library(b"first build")).unwrap();
        let first = store.import(&source, None, false).unwrap();
        let again = store.import(&source, None, false).unwrap();
        assert_eq!(first.hash, again.hash);
        assert_eq!(fs::read(&first.path).unwrap(), fake_library(b"first build"));
        let mode = fs::metadata(&first.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o444);

        // The store copy is a snapshot: changing the source changes nothing.
        fs::write(&source, fake_library(b"second build")).unwrap();
        let second = store.import(&source, None, false).unwrap();
        assert_ne!(first.hash, second.hash);
        assert_eq!(fs::read(&first.path).unwrap(), fake_library(b"first build"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_name_that_could_mean_two_versions_is_an_error_listing_both() {
        let dir =
            std::env::temp_dir().join(format!("host-store-test-names-{}", std::process::id()));
        let store = HandlerStore::open(&dir.join("store"), Owners::current()).unwrap();
        let source = dir.join("lib.so");
        fs::write(&source, fake_library(b"one")).unwrap();
        let one = store.import(&source, None, false).unwrap();
        fs::write(&source, fake_library(b"two")).unwrap();
        let two = store.import(&source, Some("release-2"), false).unwrap();
        // A label written before labels were checked, shadowing a prefix.
        let mut info = store.info(&two.hash).unwrap();
        info.label = Some(one.hash[..6].to_owned());
        store.save_info(&info).unwrap();
        let error = store.resolve(&one.hash[..6]).unwrap_err().to_string();
        assert!(error.contains("could mean 2 versions"), "{error}");
        assert!(
            error.contains(one.short()) && error.contains(two.short()),
            "{error}"
        );
        assert_eq!(store.resolve(&one.hash[..8]).unwrap(), one.hash);
        assert!(store.import(&source, Some("abcd"), false).is_err());
        assert!(store.import(&source, Some(""), false).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_and_empty_files_are_refused() {
        let dir =
            std::env::temp_dir().join(format!("host-store-test-empty-{}", std::process::id()));
        let store = HandlerStore::open(&dir.join("store"), Owners::current()).unwrap();
        let missing = store.import(&dir.join("nope.so"), None, false).unwrap_err();
        assert!(format!("{missing:#}").contains("No such file"));
        fs::write(dir.join("empty.so"), b"").unwrap();
        let empty = store
            .import(&dir.join("empty.so"), None, false)
            .unwrap_err();
        assert!(format!("{empty:#}").contains("is empty"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
