//! The configuration file (`host.toml`) and the built-in default.
//!
//! Relative paths in a file are resolved against the file's directory, so a
//! config means the same thing whatever directory `host` is run from. With no
//! file at all, `host` serves the sample handler that `cargo build` put next
//! to the `host` binary, on 127.0.0.1:8080, one worker per core.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

/// The file looked for in the current directory when `-c` is not given.
pub const DEFAULT_FILE: &str = "host.toml";

/// The whole configuration, paths resolved.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Control socket, pid file, log file and handler store live here.
    #[serde(default = "default_run_dir")]
    pub run_dir: PathBuf,
    /// When started as root: bind the listeners, then run the master and its
    /// workers as this user.
    #[serde(default)]
    pub user: Option<String>,
    /// Where to serve `/metrics` and `/healthz` (off when unset).
    #[serde(default)]
    pub admin: Option<SocketAddr>,
    /// Reload a group automatically when its handler file is rebuilt.
    #[serde(default)]
    pub watch: bool,
    /// After each successful reload, store builds beyond this many most
    /// recent ones are removed unless something needs them (pinned,
    /// labelled, in use, a rollback target).
    #[serde(default = "default_keep_versions")]
    pub keep_versions: usize,
    /// The worker groups, each with its own listener and handler.
    #[serde(rename = "group")]
    pub groups: Vec<GroupConfig>,
    /// Whether this is the built-in config (no file).
    #[serde(skip)]
    pub builtin: bool,
    /// The file it was read from (absolute), read again on reload; `None`
    /// for the built-in config.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// How a worker runs its handler calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dispatch {
    /// On the worker's event loop: fastest for handlers that never block.
    Inline,
    /// On a pool of `pool_threads` threads per worker: for handlers that sleep
    /// or do blocking I/O, so one slow call does not stall the connections.
    Pool,
}

/// What a group's listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP requests, answered by the handler's `handle`.
    #[default]
    Http,
    /// RFC 6455 WebSocket clients, held by gateway processes.
    WebSocket,
    /// Newline-delimited messages over TCP, held by gateway processes.
    Text,
}

/// Which processes a (possibly derived) group runs. A gateway group of the
/// file becomes two groups of the master: its gateways (host code, never
/// reloaded) and its business workers (the handler, reloaded).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum GroupPart {
    /// Workers that serve HTTP themselves.
    #[default]
    Http,
    /// The gateway processes of gateway group `of`.
    Gateways {
        /// The gateway group's name (that of its business workers).
        of: String,
    },
    /// The business workers of a gateway group with `gateways` gateways.
    Business {
        /// How many gateway processes each worker links to.
        gateways: usize,
    },
}

/// The suffix of the derived group holding a gateway group's gateways.
pub const GATEWAYS_SUFFIX: &str = "-gateways";

/// One group of identical workers sharing one listening socket. It
/// serializes (to compare two of them key by key on reload) and compares
/// as a whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// Name used in logs, status and `reload --group`.
    pub name: String,
    /// Address to listen on; port 0 picks a free port (shown by `status`).
    pub listen: SocketAddr,
    /// Number of worker processes.
    #[serde(default = "default_count")]
    pub count: usize,
    /// The handler library (`.so`) the workers load.
    pub handler: PathBuf,
    /// If set, the only handler bytes this group may run (hex sha256).
    #[serde(default)]
    pub sha256: Option<String>,
    /// Load the handler even if other users can write to it or its directory.
    #[serde(default)]
    pub allow_writable_handler: bool,
    /// Whether `reload` replaces this group's workers.
    #[serde(default = "default_true")]
    pub reloadable: bool,
    /// How long a new worker may take to load its handler and report ready.
    #[serde(default = "default_start_timeout", with = "humantime_serde")]
    pub start_timeout: Duration,
    /// How long a retiring worker may take to finish; then it is killed.
    #[serde(default = "default_stop_timeout", with = "humantime_serde")]
    pub stop_timeout: Duration,
    /// How long a retiring worker keeps idle keep-alive connections open,
    /// answering with `Connection: close`, before closing them.
    #[serde(default = "default_lame_duck", with = "humantime_serde")]
    pub lame_duck: Duration,
    /// Where handler calls run.
    #[serde(default = "default_dispatch")]
    pub dispatch: Dispatch,
    /// Threads per worker when `dispatch = "pool"`.
    #[serde(default = "default_pool_threads")]
    pub pool_threads: usize,
    /// Largest request body accepted; larger ones get `413`.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Largest request head (request line + headers); larger ones get `431`.
    #[serde(default = "default_max_header")]
    pub max_header_bytes: usize,
    /// How long a connection may wait for, or take to send, its next request
    /// head (idle keep-alive included); then it is closed. Checked once a
    /// second.
    #[serde(default = "default_header_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Longest pause while a request body is being received; then the
    /// request is answered `408` and the connection closed.
    #[serde(default = "default_body_timeout", with = "humantime_serde")]
    pub body_timeout: Duration,
    /// How long a handler call may run; then the worker is replaced (its
    /// replacement starts first) and, with `dispatch = "pool"`, the request
    /// is answered `503`. Off when unset. Checked once a second.
    #[serde(default, with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    /// Where each worker writes one line per answered request: a file
    /// (relative to the config's directory) or `"stderr"`; off when unset.
    #[serde(default)]
    pub access_log: Option<AccessLogTarget>,
    /// The access log's line format.
    #[serde(default)]
    pub access_log_format: AccessLogFormat,
    /// Free-form settings handed to the handler's start callback.
    #[serde(default)]
    pub settings: BTreeMap<String, toml::Value>,
    /// What the listener speaks; `websocket` and `text` make a gateway group.
    #[serde(default)]
    pub protocol: Protocol,
    /// Gateway processes of a gateway group (they hold the clients).
    #[serde(default = "default_gateways")]
    pub gateways: usize,
    /// Largest message a client may send (WebSocket: after reassembly);
    /// larger ones close the client (1009).
    #[serde(default = "default_max_message")]
    pub max_message_size: usize,
    /// Longest line of the `text` protocol, newline excluded.
    #[serde(default = "default_max_line")]
    pub max_line: usize,
    /// Bytes the gateway may hold for a client that does not read; past
    /// that the client is closed (1008), so a slow reader costs bounded memory.
    #[serde(default = "default_max_outbound")]
    pub max_outbound_bytes: usize,
    /// How often the gateway pings an idle WebSocket client.
    #[serde(default = "default_ping_interval", with = "humantime_serde")]
    pub ping_interval: Duration,
    /// Pings in a row a client may leave unanswered before it is closed.
    #[serde(default = "default_missed_pongs")]
    pub missed_pongs: u32,
    /// A client that sends nothing (not even a pong) this long is closed.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Events a gateway keeps while no business worker can take them;
    /// a client whose event does not fit is closed with 1013.
    #[serde(default = "default_max_queued_events")]
    pub max_queued_events: usize,
    /// If set, the only `Origin` headers a WebSocket handshake may carry
    /// (others get 403); clients sending no `Origin` are not browsers and
    /// are let in.
    #[serde(default)]
    pub origins: Option<Vec<String>>,
    /// An HTTP group's handler may send to the clients of this gateway
    /// group (`handler_api::gateway()`).
    #[serde(default)]
    pub push: Option<String>,
    /// How many gateways the `push` group has (derived).
    #[serde(skip)]
    pub push_gateways: usize,
    /// Which part of a gateway group this is (derived, never in a file).
    #[serde(skip)]
    pub part: GroupPart,
}

/// Where a group's access log goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "PathBuf", into = "PathBuf")]
pub enum AccessLogTarget {
    /// The worker's stderr (the host's log when daemonized).
    Stderr,
    /// A file, opened with `O_APPEND` by every worker of the group.
    File(PathBuf),
}

impl From<PathBuf> for AccessLogTarget {
    fn from(path: PathBuf) -> AccessLogTarget {
        if path.as_os_str() == "stderr" {
            AccessLogTarget::Stderr
        } else {
            AccessLogTarget::File(path)
        }
    }
}

impl From<AccessLogTarget> for PathBuf {
    fn from(target: AccessLogTarget) -> PathBuf {
        match target {
            AccessLogTarget::Stderr => PathBuf::from("stderr"),
            AccessLogTarget::File(path) => path,
        }
    }
}

/// The access log's line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    /// The Common Log Format, then the duration in microseconds, the group
    /// and the worker's pid.
    #[default]
    Common,
    /// One JSON object per line.
    Json,
}

fn default_run_dir() -> PathBuf {
    PathBuf::from(".host")
}
fn default_keep_versions() -> usize {
    5
}
fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
fn default_true() -> bool {
    true
}
fn default_start_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_stop_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_lame_duck() -> Duration {
    Duration::from_secs(1)
}
fn default_dispatch() -> Dispatch {
    Dispatch::Inline
}
fn default_pool_threads() -> usize {
    4
}
fn default_max_body() -> usize {
    1 << 20
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_body_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_max_header() -> usize {
    16 << 10
}
fn default_gateways() -> usize {
    1
}
fn default_max_message() -> usize {
    1 << 20
}
fn default_max_line() -> usize {
    64 << 10
}
fn default_max_outbound() -> usize {
    4 << 20
}
fn default_ping_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_missed_pongs() -> u32 {
    2
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_max_queued_events() -> usize {
    10_000
}

impl GroupConfig {
    /// The handler settings as text, the form the ABI carries.
    pub fn settings_as_text(&self) -> Vec<(String, String)> {
        self.settings
            .iter()
            .map(|(k, v)| {
                let text = match v {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), text)
            })
            .collect()
    }
}

impl Config {
    /// Loads `path`, or `host.toml` in the current directory, or the default.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        match config_file(path) {
            Some(path) => Self::from_file(path),
            None => Self::builtin(),
        }
    }

    fn from_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        let config: Config = toml::from_str(&text).map_err(|e| {
            let content = e.span().map(|span| {
                let line = text[..span.start].matches('\n').count() + 1;
                (line, text.lines().nth(line - 1).unwrap_or("").trim())
            });
            let place = content.map_or_else(String::new, |(line, content)| {
                format!(" line {line} ({content})")
            });
            let hint = content.and_then(|(_, content)| hint(content));
            anyhow::anyhow!(
                "invalid config {}{place}: {}{}",
                path.display(),
                e.message().trim(),
                hint.map(|h| format!("; {h}")).unwrap_or_default()
            )
        })?;
        let base = directory_of(path)?;
        let mut config = config
            .resolve(&base)
            .with_context(|| format!("invalid config {}", path.display()))?;
        config.source = path.file_name().map(|name| base.join(name));
        Ok(config)
    }

    /// The same config, read again from where it came from: the file as
    /// it is now, or the built-in config.
    pub fn reread(&self) -> Result<Config> {
        match &self.source {
            Some(path) => Self::from_file(path),
            None => Self::builtin(),
        }
    }

    /// The configuration used when there is no file.
    pub fn builtin() -> Result<Config> {
        let exe = std::env::current_exe().context("cannot locate the host binary")?;
        let handler = exe
            .parent()
            .map(|dir| dir.join("libsample_handler.so"))
            .context("the host binary has no parent directory")?;
        let text = format!(
            "[[group]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\nhandler = {:?}\n",
            handler.display().to_string()
        );
        let mut config: Config = toml::from_str(&text).context("built-in config")?;
        config.builtin = true;
        // Next to the binary, like the handler: the same host whatever
        // directory a command runs from.
        config.resolve(
            exe.parent()
                .context("the host binary has no parent directory")?,
        )
    }

    /// A config that only knows where a running master is: for `stop` and
    /// `status` when the file no longer parses.
    pub fn reach_only(run_dir: PathBuf) -> Config {
        Config {
            run_dir,
            user: None,
            admin: None,
            watch: false,
            keep_versions: default_keep_versions(),
            groups: Vec::new(),
            builtin: false,
            source: None,
        }
    }

    /// The run directory a config names, found even when the rest of the
    /// file no longer parses or validates (a top-level `run_dir = "..."`
    /// line, else the default), so a broken edit never locks anyone out of
    /// the host that is running.
    pub fn locate_run_dir(path: Option<&Path>) -> Result<PathBuf> {
        let Some(path) = config_file(path) else {
            return Ok(Self::builtin()?.run_dir);
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        let named = match text.parse::<toml::Table>() {
            Ok(table) => table
                .get("run_dir")
                .and_then(|v| v.as_str())
                .map(str::to_owned),
            Err(_) => text
                .lines()
                .take_while(|l| !l.trim_start().starts_with('['))
                .find_map(|l| {
                    let (key, value) = l.split_once('=')?;
                    (key.trim() == "run_dir").then(|| value.trim().trim_matches('"').to_owned())
                }),
        };
        let base = directory_of(path)?;
        Ok(base.join(named.map_or_else(default_run_dir, PathBuf::from)))
    }

    fn resolve(mut self, base: &Path) -> Result<Config> {
        self.run_dir = base.join(&self.run_dir);
        if self.groups.is_empty() {
            bail!("no [[group]] defined: at least one group is needed");
        }
        self.groups = split_gateway_groups(self.groups)?;
        resolve_pushes(&mut self.groups)?;
        let mut names = std::collections::HashSet::new();
        for group in &mut self.groups {
            if group.name.is_empty() || group.name.contains(['/', ' ']) {
                bail!(
                    "group name {:?} must be non-empty, without spaces or '/'",
                    group.name
                );
            }
            if !names.insert(group.name.clone()) {
                bail!("two groups are named {:?}", group.name);
            }
            if group.count == 0 {
                bail!("group {}: count must be at least 1", group.name);
            }
            if group.dispatch == Dispatch::Pool && group.pool_threads == 0 {
                bail!("group {}: pool_threads must be at least 1", group.name);
            }
            for (key, timeout) in [
                ("header_timeout", Some(group.header_timeout)),
                ("body_timeout", Some(group.body_timeout)),
                ("request_timeout", group.request_timeout),
            ] {
                let Some(timeout) = timeout else { continue };
                if timeout < Duration::from_secs(1) {
                    bail!(
                        "group {}: {key} ({timeout:?}) must be at least 1s",
                        group.name
                    );
                }
            }
            if group.stop_timeout < group.lame_duck {
                bail!(
                    "group {}: stop_timeout ({:?}) must not be shorter than lame_duck ({:?})",
                    group.name,
                    group.stop_timeout,
                    group.lame_duck
                );
            }
            if let Some(hash) = &mut group.sha256 {
                *hash = hash.to_ascii_lowercase();
                if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                    bail!("group {}: sha256 must be 64 hex digits", group.name);
                }
            }
            group.handler = base.join(&group.handler);
            if let Some(AccessLogTarget::File(path)) = &mut group.access_log {
                *path = base.join(&*path);
            }
        }
        Ok(self)
    }
}

/// The file a command reads: `-c`'s, else `host.toml` in the current
/// directory if there is one; `None` means the built-in config.
fn config_file(path: Option<&Path>) -> Option<&Path> {
    path.or_else(|| Some(Path::new(DEFAULT_FILE)).filter(|p| p.exists()))
}

/// The directory a config file's relative paths are resolved against.
fn directory_of(path: &Path) -> Result<PathBuf> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::canonicalize(dir)
        .with_context(|| format!("cannot resolve directory of {}", path.display()))
}

/// What to write instead, for the mistakes people make most with the line
/// a parse error points at.
fn hint(line: &str) -> Option<&'static str> {
    let key = line.split('=').next().unwrap_or("").trim();
    match key {
        "start_timeout" | "stop_timeout" | "lame_duck" | "header_timeout" | "body_timeout"
        | "request_timeout" => Some("expected a duration such as \"10s\" or \"500ms\""),
        "listen" | "admin" => Some("an address is IP:PORT, e.g. 127.0.0.1:80 (no host names)"),
        "[group]" => Some("use [[group]] (an array of tables), once per group"),
        _ => None,
    }
}

/// Replaces each gateway group by its gateways (first, not reloadable, on
/// the group's address) and its business workers (named as the group).
fn split_gateway_groups(groups: Vec<GroupConfig>) -> Result<Vec<GroupConfig>> {
    let mut split = Vec::with_capacity(groups.len());
    for group in groups {
        if group.protocol == Protocol::Http {
            split.push(group);
            continue;
        }
        if group.gateways == 0 || group.gateways > usize::from(u16::MAX) {
            bail!("group {}: gateways must be between 1 and 65535", group.name);
        }
        if !group.reloadable {
            bail!(
                "group {}: a gateway group's business workers are reloadable (its gateways never are)",
                group.name
            );
        }
        if group.max_queued_events == 0 || group.missed_pongs == 0 || group.max_line == 0 {
            bail!(
                "group {}: max_queued_events, missed_pongs and max_line must be at least 1",
                group.name
            );
        }
        let mut gateways = group.clone();
        gateways.name = format!("{}{GATEWAYS_SUFFIX}", group.name);
        gateways.count = group.gateways;
        gateways.reloadable = false;
        gateways.part = GroupPart::Gateways {
            of: group.name.clone(),
        };
        split.push(gateways);
        let mut business = group;
        business.part = GroupPart::Business {
            gateways: business.gateways,
        };
        split.push(business);
    }
    Ok(split)
}

/// Checks each `push` names a gateway group and notes its gateway count.
fn resolve_pushes(groups: &mut [GroupConfig]) -> Result<()> {
    let gateway_groups: std::collections::HashMap<String, usize> = groups
        .iter()
        .filter_map(|g| match g.part {
            GroupPart::Business { gateways } => Some((g.name.clone(), gateways)),
            _ => None,
        })
        .collect();
    for group in groups.iter_mut() {
        let Some(target) = &group.push else { continue };
        if group.part != GroupPart::Http {
            bail!(
                "group {}: only an HTTP group can push to a gateway group",
                group.name
            );
        }
        group.push_gateways = *gateway_groups.get(target).with_context(|| {
            format!(
                "group {}: push = {target:?} names no group with protocol = \"websocket\" or \"text\"",
                group.name
            )
        })?;
    }
    Ok(())
}

/// Files inside the run directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    /// The directory itself.
    pub root: PathBuf,
}

impl RunDir {
    /// The run directory of `config`.
    pub fn of(config: &Config) -> RunDir {
        RunDir {
            root: config.run_dir.clone(),
        }
    }
    /// Creates the directory (owner-only) if it is missing, then checks
    /// that it, the directories above it and everything in it belong to
    /// `owners`: a run directory another user prepared is refused, never
    /// adopted.
    pub fn prepare(&self, owners: crate::trust::Owners) -> Result<()> {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .with_context(|| format!("cannot create run directory {}", self.root.display()))?;
        crate::trust::check_tree(&self.root, owners).context("refusing to use the run directory")
    }
    /// The master's control socket.
    pub fn control_socket(&self) -> PathBuf {
        self.root.join("control.sock")
    }
    /// Held locked by the running master.
    pub fn lock_file(&self) -> PathBuf {
        self.root.join("host.lock")
    }
    /// The master's pid.
    pub fn pid_file(&self) -> PathBuf {
        self.root.join("host.pid")
    }
    /// Where a daemonized master logs.
    pub fn log_file(&self) -> PathBuf {
        self.root.join("host.log")
    }
    /// The content-addressed handler store.
    pub fn store(&self) -> PathBuf {
        self.root.join("store")
    }
    /// Which version each pinned group runs.
    pub fn pins(&self) -> PathBuf {
        self.root.join("pins.json")
    }
    /// The socket gateway `index` of gateway group `group` listens on for
    /// its business workers.
    pub fn gateway_socket(&self, group: &str, index: usize) -> PathBuf {
        self.root.join(format!("gateway-{group}-{index}.sock"))
    }
    /// The versions each group ran, oldest first.
    pub fn history(&self) -> PathBuf {
        self.root.join("history.json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        let config: Config = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        config.resolve(Path::new("/srv/app"))
    }

    #[test]
    fn relative_paths_resolve_against_the_config_directory() {
        let config = parse(
            "run_dir = \"run\"\n[[group]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\ncount = 2\nhandler = \"lib/h.so\"\n",
        )
        .unwrap();
        assert_eq!(config.run_dir, Path::new("/srv/app/run"));
        assert_eq!(config.groups[0].handler, Path::new("/srv/app/lib/h.so"));
        assert!(config.groups[0].reloadable);
        assert_eq!(config.groups[0].stop_timeout, Duration::from_secs(10));
    }

    #[test]
    fn the_access_log_is_off_by_default_and_resolves_like_any_path() {
        let group = |extra: &str| {
            parse(&format!(
                "[[group]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nhandler = \"h.so\"\n{extra}"
            ))
            .unwrap()
            .groups
            .remove(0)
        };
        let off = group("");
        assert_eq!(off.access_log, None);
        assert_eq!(off.access_log_format, AccessLogFormat::Common);
        assert_eq!(
            group("access_log = \"stderr\"").access_log,
            Some(AccessLogTarget::Stderr)
        );
        let file = group("access_log = \"logs/access.log\"\naccess_log_format = \"json\"");
        assert_eq!(
            file.access_log,
            Some(AccessLogTarget::File("/srv/app/logs/access.log".into()))
        );
        assert_eq!(file.access_log_format, AccessLogFormat::Json);
    }

    #[test]
    fn durations_and_settings_parse() {
        let config = parse(
            "[[group]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nhandler = \"h.so\"\nstart_timeout = \"500ms\"\n[group.settings]\ngreeting = \"hi\"\nanswer = 42\n",
        )
        .unwrap();
        let group = &config.groups[0];
        assert_eq!(group.start_timeout, Duration::from_millis(500));
        assert_eq!(
            group.settings_as_text(),
            vec![
                ("answer".to_owned(), "42".to_owned()),
                ("greeting".to_owned(), "hi".to_owned())
            ]
        );
    }

    #[test]
    fn the_builtin_run_directory_does_not_depend_on_the_current_directory() {
        let config = Config::builtin().unwrap();
        let exe = std::env::current_exe().unwrap();
        assert_eq!(config.run_dir, exe.parent().unwrap().join(".host"));
        assert!(config.builtin);
    }

    #[test]
    fn a_run_directory_is_found_in_a_config_that_does_not_parse() {
        let dir = std::env::temp_dir().join(format!("host-locate-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("host.toml");
        std::fs::write(&path, "run_dir = \"state\"\n[group]\nname = \n").unwrap();
        assert!(Config::load(Some(&path)).is_err());
        let found = Config::locate_run_dir(Some(&path)).unwrap();
        assert_eq!(found, std::fs::canonicalize(&dir).unwrap().join("state"));
        std::fs::write(&path, "[[group]]\nname = \"web\"\n").unwrap();
        let found = Config::locate_run_dir(Some(&path)).unwrap();
        assert_eq!(found, std::fs::canonicalize(&dir).unwrap().join(".host"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_gateway_group_becomes_its_gateways_then_its_business_workers() {
        let config = parse(
            "[[group]]\nname = \"chat\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"websocket\"\ngateways = 2\ncount = 3\nhandler = \"c.so\"\n",
        )
        .unwrap();
        let [gateways, business] = &config.groups[..] else {
            panic!("two groups expected");
        };
        assert_eq!(gateways.name, "chat-gateways");
        assert_eq!((gateways.count, gateways.reloadable), (2, false));
        assert_eq!(
            gateways.part,
            GroupPart::Gateways {
                of: "chat".to_owned()
            }
        );
        assert_eq!((business.name.as_str(), business.count), ("chat", 3));
        assert_eq!(business.part, GroupPart::Business { gateways: 2 });
        let clash = parse(
            "[[group]]\nname = \"chat\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"text\"\nhandler = \"c.so\"\n[[group]]\nname = \"chat-gateways\"\nlisten = \"127.0.0.1:0\"\nhandler = \"c.so\"\n",
        );
        assert!(format!("{:#}", clash.unwrap_err()).contains("two groups are named"));
    }

    #[test]
    fn an_http_group_pushes_only_to_a_gateway_group() {
        let chat = "[[group]]\nname = \"chat\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"websocket\"\ngateways = 3\nhandler = \"c.so\"\n";
        let config = parse(&format!(
            "{chat}[[group]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\npush = \"chat\"\nhandler = \"c.so\"\n"
        ))
        .unwrap();
        assert_eq!(config.groups[2].push_gateways, 3);
        let nowhere = parse(&format!(
            "{chat}[[group]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\npush = \"web\"\nhandler = \"c.so\"\n"
        ));
        assert!(format!("{:#}", nowhere.unwrap_err()).contains("names no group with protocol"));
    }

    #[test]
    fn file_errors_name_the_file_and_the_line_once() {
        let dir = std::env::temp_dir().join(format!("host-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("host.toml");
        std::fs::write(
            &path,
            "[[group]]\nname = \"web\"\nlisten = \"localhost\"\nhandler = \"h.so\"\n",
        )
        .unwrap();
        let error = format!("{:#}", Config::load(Some(&path)).unwrap_err());
        assert_eq!(error.matches("host.toml").count(), 1, "{error}");
        assert!(error.contains("line 3 (listen = \"localhost\")"), "{error}");
        assert!(error.contains("invalid socket address"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unknown_keys_bad_addresses_and_duplicates_are_refused() {
        let unknown = parse(
            "[[group]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nhandler = \"h.so\"\ncont = 2\n",
        );
        assert!(format!("{:#}", unknown.unwrap_err()).contains("unknown field `cont`"));
        let address =
            parse("[[group]]\nname = \"web\"\nlisten = \"localhost\"\nhandler = \"h.so\"\n");
        assert!(format!("{:#}", address.unwrap_err()).contains("invalid socket address"));
        let twice = parse(
            "[[group]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nhandler = \"h.so\"\n[[group]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nhandler = \"h.so\"\n",
        );
        assert!(format!("{:#}", twice.unwrap_err()).contains("two groups are named"));
        let short = parse(
            "[[group]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nhandler = \"h.so\"\nheader_timeout = \"500ms\"\n",
        );
        assert!(format!("{:#}", short.unwrap_err())
            .contains("header_timeout (500ms) must be at least 1s"));
    }
}
