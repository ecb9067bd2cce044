//! The content-addressed handler store.
//!
//! Workers never `dlopen` a file under `target/`: copying over a mapped
//! library crashes every process using it. The master copies each handler
//! build into `<run dir>/store/<sha256>.so` (temp file, fsync, rename, mode
//! 0444) and workers load only those paths. A version is the hash of the
//! bytes, so one reload loads the same bytes in every worker even if the
//! source file changes meanwhile.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use sha2::{Digest, Sha256};

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
        &self.hash[..12]
    }
}

/// The store directory.
#[derive(Debug, Clone)]
pub struct HandlerStore {
    dir: PathBuf,
}

impl HandlerStore {
    /// Opens (creating if needed) the store at `dir`, owner-only.
    pub fn open(dir: &Path) -> Result<HandlerStore> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create the handler store {}", dir.display()))?;
        Ok(HandlerStore {
            dir: dir.to_owned(),
        })
    }

    /// Snapshots `source` into the store and returns its version.
    pub fn import(&self, source: &Path) -> Result<Arc<Version>> {
        let bytes = fs::read(source)
            .with_context(|| format!("cannot read handler {}", source.display()))?;
        check_shared_library(&bytes).with_context(|| format!("handler {}", source.display()))?;
        let hash = hex(&Sha256::digest(&bytes));
        let path = self.dir.join(format!("{hash}.so"));
        if !path.exists() {
            self.write_atomically(&path, &bytes)
                .with_context(|| format!("cannot store handler {}", source.display()))?;
        }
        Ok(Arc::new(Version {
            hash,
            path,
            source: source.to_owned(),
        }))
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
        let store = HandlerStore::open(&dir.join("store")).unwrap();
        let source = dir.join("lib.so");
        fs::write(&source, fake_library(b"first build")).unwrap();
        let first = store.import(&source).unwrap();
        let again = store.import(&source).unwrap();
        assert_eq!(first.hash, again.hash);
        assert_eq!(fs::read(&first.path).unwrap(), fake_library(b"first build"));
        let mode = fs::metadata(&first.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o444);

        // The store copy is a snapshot: changing the source changes nothing.
        fs::write(&source, fake_library(b"second build")).unwrap();
        let second = store.import(&source).unwrap();
        assert_ne!(first.hash, second.hash);
        assert_eq!(fs::read(&first.path).unwrap(), fake_library(b"first build"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_and_empty_files_are_refused() {
        let dir =
            std::env::temp_dir().join(format!("host-store-test-empty-{}", std::process::id()));
        let store = HandlerStore::open(&dir.join("store")).unwrap();
        let missing = store.import(&dir.join("nope.so")).unwrap_err();
        assert!(format!("{missing:#}").contains("No such file"));
        fs::write(dir.join("empty.so"), b"").unwrap();
        let empty = store.import(&dir.join("empty.so")).unwrap_err();
        assert!(format!("{empty:#}").contains("is empty"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
