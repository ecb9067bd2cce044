//! Loading a handler library and turning abi_stable's errors into one line.
//!
//! abi_stable checks, at load time, that the library exports the handler root
//! module, was built against a compatible `handler-api` version, and that
//! every type crossing the boundary has the layout this host expects. Its
//! layout report runs to hundreds of lines; users get a short summary and the
//! full text is logged at debug level.

use std::path::Path;

use abi_stable::library::{LibraryError, RootModule};
use handler_api::HandlerModuleRef;

/// Loads the handler at `path`; the error is a one-line explanation that
/// calls the library `shown` (its source file, which users know).
///
/// abi_stable caches the root module per process, failures included, so
/// this must be called at most once per worker process.
pub fn load(path: &Path, shown: &str) -> Result<HandlerModuleRef, String> {
    HandlerModuleRef::load_from_file(path).map_err(|e| describe(shown, &e))
}

fn describe(shown: &str, error: &LibraryError) -> String {
    match error {
        LibraryError::OpenError { err, .. } => {
            format!("cannot load {shown}: {}", open_error_reason(&err.to_string()))
        }
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
            .map(|e| describe(shown, e))
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
        let Err(error) = load(Path::new("/nonexistent/handler.so"), "handler.so") else {
            panic!("a missing file loaded");
        };
        assert!(error.starts_with("cannot load handler.so: "), "{error}");
        assert!(error.contains("No such file"), "{error}");
    }
}
