//! Loading a handler library and turning abi_stable's errors into one line.
//!
//! abi_stable checks, at load time, that the library exports the handler root
//! module, was built against a compatible `handler-api` version, and that
//! every type crossing the boundary has the layout this host expects. Its
//! layout report runs to hundreds of lines; users get a short summary and the
//! full text is logged at debug level.
//!
//! The bytes loaded are the bytes verified: the store copy is opened once,
//! checked (owner, mode, and that its sha256 is the hash its name says), and
//! `dlopen`ed through that same descriptor (`/proc/self/fd/N`), so nothing
//! can swap the file between the check and the load.

use std::fs::File;
use std::io::Read as _;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use abi_stable::library::{LibraryError, RawLibrary, RootModule};
use anyhow::{bail, Context as _};
use handler_api::{ConnectionExport, ConnectionModuleRef, HandlerModuleRef};

use crate::trust::{self, Owners};
use crate::versions::store::hash_bytes;

/// Loads the handler store copy at `path` (named `<sha256>.so`); the error
/// is a one-line explanation that names the store copy and calls the
/// library `shown` (its source file, which users know).
///
/// abi_stable caches the root module per process, failures included, so
/// this must be called at most once per worker process.
pub fn load(path: &Path, shown: &str) -> Result<Loaded, String> {
    let file = open_verified(path).map_err(|e| {
        format!(
            "cannot load {} (the store copy of {shown}): {e:#}",
            path.display()
        )
    })?;
    let through = format!("/proc/self/fd/{}", file.as_raw_fd());
    let module = HandlerModuleRef::load_from_file(Path::new(&through))
        .map_err(|e| describe(path, shown, &e))?;
    let connections = connections(Path::new(&through), shown)?;
    drop(file);
    Ok(Loaded {
        module,
        connections,
    })
}

/// A loaded handler library's entry points.
#[derive(Clone, Copy)]
pub struct Loaded {
    /// The root module (HTTP and lifecycle).
    pub module: HandlerModuleRef,
    /// The connection entry points, if the library has them (built against
    /// handler-api 0.2.1 or later).
    pub connections: Option<ConnectionModuleRef>,
}

/// The library's connection module, looked up by symbol in the library
/// abi_stable just loaded (the same object: dlopen counts references) and
/// checked like the root module before any use.
fn connections(through: &Path, shown: &str) -> Result<Option<ConnectionModuleRef>, String> {
    let library =
        RawLibrary::load_at(through).map_err(|e| format!("cannot reopen {shown}: {e}"))?;
    // SAFETY: the symbol, when present, is the `extern "C" fn` that
    // `export_handler!` defines with this name and signature.
    let export = unsafe {
        library.get::<extern "C" fn() -> ConnectionExport>(handler_api::CONNECTION_EXPORT_SYMBOL)
    };
    let Ok(export) = export else {
        return Ok(None);
    };
    let export = (*export)();
    let ours = <ConnectionModuleRef as abi_stable::StableAbi>::LAYOUT;
    abi_stable::abi_stability::abi_checking::check_layout_compatibility(ours, export.layout)
        .map_err(|e| {
            format!(
                "{shown} has connection entry points of an incompatible handler-api: {}; rebuild it against handler-api {}",
                summarize_layout_report(&e.to_string()),
                HandlerModuleRef::VERSION_STRINGS.version
            )
        })?;
    // The library stays loaded: abi_stable keeps its own handle for the
    // life of the process, so dropping this one only lowers the count.
    Ok(Some(export.module))
}

/// Opens a store entry and checks that only root or this process's user
/// can change it and that its bytes hash to its name.
fn open_verified(path: &Path) -> anyhow::Result<File> {
    let expected = path
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .context("not a handler store path (<sha256>.so)")?;
    let mut file = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        bail!("not a regular file");
    }
    trust::check_entry(path, &meta, Owners::current(), true)?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.read_to_end(&mut bytes)?;
    let found = hash_bytes(&bytes);
    if found != expected {
        bail!(
            "its bytes do not match its name (sha256 {found}): the store entry is corrupted or was tampered with; `host reload` stores the handler again"
        );
    }
    Ok(file)
}

fn describe(path: &Path, shown: &str, error: &LibraryError) -> String {
    match error {
        LibraryError::OpenError { err, .. } => format!(
            "cannot load {} (the store copy of {shown}): {}",
            path.display(),
            open_error_reason(&err.to_string())
        ),
        LibraryError::GetSymbolError { .. } => format!(
            "{shown} is a shared library but not a handler: it exports no handler module \
             (build it with handler_api::export_handler!)"
        ),
        LibraryError::IncompatibleVersionNumber {
            expected_version,
            actual_version,
            ..
        } => format!(
            "{shown} was built against handler-api {actual_version}, this host speaks \
             handler-api {expected_version}: rebuild the handler against handler-api {expected_version}"
        ),
        LibraryError::AbiInstability(report) => {
            let report = report.to_string();
            tracing::debug!(report = %report, "full abi_stable layout report");
            format!(
                "{shown} was built against an incompatible handler-api: {}; rebuild it \
                 against handler-api {}",
                summarize_layout_report(&report),
                HandlerModuleRef::VERSION_STRINGS.version
            )
        }
        LibraryError::InvalidAbiHeader(_) | LibraryError::InvalidCAbi { .. } => format!(
            "{shown} was built with an incompatible abi_stable or compiler ABI: rebuild it \
             against this host's handler-api"
        ),
        LibraryError::RootModule { err, .. } => {
            format!("{shown}: the handler module failed to initialise: {err}")
        }
        LibraryError::ParseVersionError(e) => format!("{shown}: bad handler-api version string: {e}"),
        LibraryError::Many(errors) => errors
            .iter()
            .map(|e| describe(path, shown, e))
            .collect::<Vec<_>>()
            .join("; "),
    }
}

/// dlopen's message repeats the path; keep what follows it.
fn open_error_reason(message: &str) -> String {
    let message = message.trim();
    match message.rfind(": ") {
        Some(i) => message[i + 2..].to_owned(),
        None => message.to_owned(),
    }
}

/// Turns abi_stable's layout report into "what differs (expected X, found Y)".
///
/// The report ends with blocks of `Error:<what>` / `Expected:` / `<value>` /
/// `Found:` / `<value>`; everything before them is the two full layouts.
fn summarize_layout_report(report: &str) -> String {
    let lines: Vec<&str> = report
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let value_after = |from: usize, label: &str| {
        lines[from..]
            .iter()
            .take(8)
            .position(|l| *l == label)
            .and_then(|at| lines.get(from + at + 1))
            .map(|v| v.to_string())
    };
    let mut differences: Vec<String> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(what) = line.strip_prefix("Error:") else {
            continue;
        };
        let difference = match (value_after(i, "Expected:"), value_after(i, "Found:")) {
            (Some(expected), Some(found)) => format!("{what} (expected {expected}, found {found})"),
            _ => what.to_owned(),
        };
        if !differences.contains(&difference) {
            differences.push(difference);
        }
    }
    if differences.is_empty() {
        return "the type layouts differ (run with HOST_LOG=debug for the full report)".to_owned();
    }
    differences.truncate(3);
    differences.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_errors_keep_the_reason() {
        assert_eq!(
            open_error_reason("/x/y.so: invalid ELF header"),
            "invalid ELF header"
        );
        assert_eq!(open_error_reason("file too short"), "file too short");
    }

    #[test]
    fn layout_reports_shrink_to_what_differs() {
        let report = "Compared <this>:\n    --- Type Layout ---\n    type:HandlerModule\n\nError:mismatched package\nExpected:\n    handler-api\nFound:\n    other-api\n\nError:mismatched package\nExpected:\n    handler-api\nFound:\n    other-api\n";
        assert_eq!(
            summarize_layout_report(report),
            "mismatched package (expected handler-api, found other-api)"
        );
    }

    #[test]
    fn missing_files_are_named() {
        let path = format!("/nonexistent/{}.so", "ab".repeat(32));
        let Err(error) = load(Path::new(&path), "handler.so") else {
            panic!("a missing file loaded");
        };
        assert!(
            error.starts_with(&format!(
                "cannot load {path} (the store copy of handler.so): "
            )),
            "{error}"
        );
        assert!(error.contains("No such file"), "{error}");
    }

    #[test]
    fn a_store_entry_whose_bytes_differ_from_its_name_is_refused() {
        let dir = std::env::temp_dir().join(format!("host-loader-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{}.so", hash_bytes(b"the verified bytes")));
        std::fs::write(&path, b"other bytes").unwrap();
        let Err(error) = load(&path, "h.so") else {
            panic!("a tampered entry loaded");
        };
        assert!(error.contains("do not match its name"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
