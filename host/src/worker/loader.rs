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

/// Loads the handler at `path`; the error is a one-line explanation.
///
/// abi_stable caches the root module per process, failures included, so
/// this must be called at most once per worker process.
pub fn load(path: &Path) -> Result<HandlerModuleRef, String> {
    HandlerModuleRef::load_from_file(path).map_err(|e| describe(path, &e))
}

fn describe(path: &Path, error: &LibraryError) -> String {
    let shown = path.display();
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
                "{shown} was built against an incompatible handler-api: {}",
                summarize_layout_report(&report)
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
            .map(|e| describe(path, e))
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

/// Picks the lines of abi_stable's layout report that say what differs.
fn summarize_layout_report(report: &str) -> String {
    let mut lines = Vec::new();
    let mut last_context = None;
    for line in report.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("error") || lower.contains("mismatch") || lower.contains("different") {
            lines.push(line.to_owned());
        } else if lower.starts_with("expected") || lower.starts_with("found") {
            if let Some(context) = last_context.take() {
                lines.push(context);
            }
            lines.push(line.to_owned());
        } else if lower.contains("field") || lower.contains("type") {
            last_context = Some(line.to_owned());
        }
        if lines.len() >= 6 {
            break;
        }
    }
    if lines.is_empty() {
        return report.lines().take(3).collect::<Vec<_>>().join(" ");
    }
    let mut summary = lines.join(" | ");
    if summary.len() > 600 {
        let mut end = 600;
        while !summary.is_char_boundary(end) {
            end -= 1;
        }
        summary.truncate(end);
        summary.push('…');
    }
    summary
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
    fn missing_files_are_named() {
        let error = load(Path::new("/nonexistent/handler.so")).unwrap_err();
        assert!(error.contains("/nonexistent/handler.so"), "{error}");
        assert!(error.contains("No such file"), "{error}");
    }
}
