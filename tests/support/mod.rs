//! Shared test harness: builds handler variants, runs the real `host`
//! binary in a private directory, and talks HTTP to it on 127.0.0.1.
//!
//! Every wait is on a condition with a generous deadline; nothing here
//! asserts on timing.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod ws;

/// How long any condition may take before a test gives up.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Whether the test runs as root; if not, says on the terminal that `test`
/// is skipped and why (straight to stderr: the harness swallows eprintln!
/// of a passing test, and a skip must not pass unseen).
pub fn root_or_skip(test: &str, why: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        let line = format!("SKIPPED {test}: needs root, {why}\n");
        let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
    }
    root
}

/// The `host` binary under test.
pub fn host_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_host"))
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// A handler build the tests need.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    /// sample-handler with `SAMPLE_VERSION=v1`.
    SampleV1,
    /// sample-handler with `SAMPLE_VERSION=v2`.
    SampleV2,
    /// faulty-handler with `FAULTY_MODE=<mode>`.
    Faulty(&'static str),
    /// A library built against an incompatible handler ABI.
    AbiMismatch,
    /// sample-handler built against a copy of handler-api that calls itself
    /// 0.3.0 (see [`other_api_workspace`]).
    OtherApiVersion,
    /// sample-handler built against handler-api 0.2.0 as released (kept in
    /// tests/fixtures): a handler from before connection events.
    OldApi,
    /// sample-echo with `ECHO_VERSION=<version>`.
    Echo(&'static str),
    /// sample-chat.
    Chat,
    /// sample-chat with `CHAT_VERSION=<version>`.
    ChatVersion(&'static str),
}

impl Variant {
    fn file_name(self) -> String {
        match self {
            Variant::SampleV1 => "sample-v1.so".into(),
            Variant::SampleV2 => "sample-v2.so".into(),
            Variant::Faulty(mode) => format!("faulty-{mode}.so"),
            Variant::AbiMismatch => "abi-mismatch.so".into(),
            Variant::OtherApiVersion => "other-api-version.so".into(),
            Variant::OldApi => "old-api.so".into(),
            Variant::Echo(version) => format!("echo-{version}.so"),
            Variant::Chat => "chat.so".into(),
            Variant::ChatVersion(version) => format!("chat-{version}.so"),
        }
    }

    fn build(
        self,
    ) -> (
        &'static str,
        &'static str,
        Option<(&'static str, &'static str)>,
    ) {
        match self {
            Variant::SampleV1 => (
                "sample-handler",
                "libsample_handler.so",
                Some(("SAMPLE_VERSION", "v1")),
            ),
            Variant::SampleV2 => (
                "sample-handler",
                "libsample_handler.so",
                Some(("SAMPLE_VERSION", "v2")),
            ),
            Variant::Faulty(mode) => (
                "faulty-handler",
                "libfaulty_handler.so",
                Some(("FAULTY_MODE", mode)),
            ),
            Variant::AbiMismatch => ("abi-mismatch-handler", "libabi_mismatch_handler.so", None),
            Variant::OtherApiVersion | Variant::OldApi => {
                ("sample-handler", "libsample_handler.so", None)
            }
            Variant::Echo(version) => (
                "sample-echo",
                "libsample_echo.so",
                Some(("ECHO_VERSION", version)),
            ),
            Variant::Chat => ("sample-chat", "libsample_chat.so", None),
            Variant::ChatVersion(version) => (
                "sample-chat",
                "libsample_chat.so",
                Some(("CHAT_VERSION", version)),
            ),
        }
    }
}

/// The path of a built handler variant; each is built once per test binary,
/// in its own target directory so tests never fight over cargo's lock with
/// the outer `cargo test`, and copied out right after its build (under a
/// file lock, so parallel test binaries never copy each other's build).
pub fn handler(variant: Variant) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<Variant, PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.get(&variant) {
        return path.clone();
    }
    let target = workspace().join("target").join("test-handlers");
    std::fs::create_dir_all(target.join("out")).unwrap();
    let lock = std::fs::File::create(target.join("build.lock")).unwrap();
    let _lock =
        nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).expect("build lock");
    let (package, artifact, env) = variant.build();
    let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cargo
        .current_dir(workspace())
        .args(["build", "--quiet", "-p", package, "--target-dir"])
        .arg(&target)
        .env_remove("SAMPLE_VERSION")
        .env_remove("ECHO_VERSION")
        .env_remove("CHAT_VERSION")
        .env_remove("FAULTY_MODE");
    if variant == Variant::OtherApiVersion {
        cargo.current_dir(other_api_workspace(&target));
    }
    if variant == Variant::OldApi {
        cargo.current_dir(old_api_workspace(&target));
    }
    if let Some((key, value)) = env {
        cargo.env(key, value);
    }
    let output = cargo.output().expect("run cargo");
    assert!(
        output.status.success(),
        "building {variant:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let out = target.join("out").join(variant.file_name());
    let temp = out.with_extension("tmp");
    std::fs::copy(target.join("debug").join(artifact), &temp).unwrap();
    std::fs::rename(&temp, &out).unwrap();
    built.insert(variant, out.clone());
    out
}

/// The version [`Variant::OtherApiVersion`] claims for handler-api.
pub const OTHER_API_VERSION: &str = "0.3.0";

/// A workspace under `target` holding copies of handler-api (its version
/// changed to [`OTHER_API_VERSION`], nothing else) and sample-handler: what
/// a handler author whose handler-api is not the host's builds.
fn other_api_workspace(target: &Path) -> PathBuf {
    let root = handler_workspace(target, "other-api", &workspace().join("handler-api"));
    let manifest = root.join("handler-api/Cargo.toml");
    let ours = format!("version = \"{}\"", handler_api_version());
    let text = std::fs::read_to_string(&manifest).unwrap();
    assert!(text.contains(&ours), "no {ours} in {}", manifest.display());
    let theirs = format!("version = \"{OTHER_API_VERSION}\"");
    std::fs::write(&manifest, text.replacen(&ours, &theirs, 1)).unwrap();
    root
}

/// A workspace under `target` holding handler-api 0.2.0 as released and
/// today's sample-handler: a handler built before connection events.
fn old_api_workspace(target: &Path) -> PathBuf {
    let released = workspace().join("tests/fixtures/handler-api-0.2.0");
    handler_workspace(target, "old-api", &released)
}

/// A workspace `target/name` of two members: a copy of `handler_api` and
/// of sample-handler, with the root manifest's settings.
fn handler_workspace(target: &Path, name: &str, handler_api: &Path) -> PathBuf {
    let root = target.join(name);
    let _ = std::fs::remove_dir_all(&root);
    copy_dir(handler_api, &root.join("handler-api"));
    copy_dir(
        &workspace().join("sample-handler"),
        &root.join("sample-handler"),
    );
    std::fs::copy(workspace().join("Cargo.lock"), root.join("Cargo.lock")).unwrap();
    // The workspace's own settings and dependency specs, for two members.
    let ours = manifest_of(&workspace().join("Cargo.toml"));
    let mut workspace_table = ours["workspace"].as_table().unwrap().clone();
    workspace_table.remove("default-members");
    workspace_table.insert(
        "members".into(),
        toml::Value::from(vec!["handler-api", "sample-handler"]),
    );
    let dependencies = workspace_table["dependencies"].as_table().unwrap();
    let kept: toml::Table = ["abi_stable", "handler-api"]
        .into_iter()
        .map(|name| (name.to_owned(), dependencies[name].clone()))
        .collect();
    workspace_table.insert("dependencies".into(), toml::Value::Table(kept));
    let mut manifest = toml::Table::new();
    manifest.insert("workspace".into(), toml::Value::Table(workspace_table));
    std::fs::write(root.join("Cargo.toml"), manifest.to_string()).unwrap();
    root
}

/// handler-api's version, from its manifest (the host speaks this one).
pub fn handler_api_version() -> String {
    manifest_of(&workspace().join("handler-api/Cargo.toml"))["package"]["version"]
        .as_str()
        .expect("handler-api/Cargo.toml has a version")
        .to_owned()
}

fn manifest_of(path: &Path) -> toml::Table {
    std::fs::read_to_string(path)
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A private directory for one test, removed at the end.
pub struct TestDir {
    pub path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("host-test-{}-{name}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TestDir { path }
    }

    /// Writes a file in the directory and returns its path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    /// Copies a handler build to `name` in the directory (the file the
    /// config points at, which a test may later overwrite with another build).
    pub fn install(&self, variant: Variant, name: &str) -> PathBuf {
        let path = self.path.join(name);
        let temp = self.path.join(format!(".{name}.tmp"));
        std::fs::copy(handler(variant), &temp).unwrap();
        // Rename like cargo does: a new inode, never a write into a mapped file.
        std::fs::rename(&temp, &path).unwrap();
        path
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A config with one group `web` of `count` workers on 127.0.0.1:0.
pub fn one_group_config(handler: &Path, count: usize, extra: &str) -> String {
    format!(
        "run_dir = \"run\"\n\n[[group]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\ncount = {count}\nhandler = {:?}\n{extra}\n",
        handler.display().to_string()
    )
}

/// Runs `host ARGS -c CONFIG` to completion (see [`run_bounded`]).
pub fn host_command(dir: &TestDir, args: &[&str]) -> Output {
    run_bounded(host_command_line(dir, args))
}

fn host_command_line(dir: &TestDir, args: &[&str]) -> Command {
    let mut command = Command::new(host_bin());
    command.current_dir(&dir.path).args(args);
    if args.first().is_some_and(|a| *a != "worker") && dir.path.join("host.toml").exists() {
        command.arg("-c").arg(dir.path.join("host.toml"));
    }
    command.env("HOST_TEST_TAG", tag(dir));
    command
}

/// Runs `host start` in the foreground where it must fail, and returns its
/// output. A master that reports it is serving instead fails the test at
/// once (it would otherwise serve until the deadline).
pub fn host_start_must_fail(dir: &TestDir) -> Output {
    let mut run = BoundedRun::start(host_command_line(dir, &["start"]));
    while !run.exited() {
        let shown = run.output_so_far();
        assert!(
            !shown.contains(": serving "),
            "host start was expected to fail, and serves:\n{shown}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    run.wait()
}

/// Runs a command to completion, as `Command::output` does, but never for
/// longer than [`DEADLINE`] (see [`BoundedRun`]).
pub fn run_bounded(command: Command) -> Output {
    BoundedRun::start(command).wait()
}

/// A command running in the background whose output can be read while it
/// runs, and which is never waited on for longer than [`DEADLINE`]: a run
/// still going then is killed and the test fails with what it printed. Every
/// run of `host` meant to end (a CLI command, a foreground start that must
/// fail) goes through here, so a broken mechanism fails its test instead of
/// hanging it.
pub struct BoundedRun {
    command: String,
    child: Child,
    started: Instant,
    /// stdout and stderr so far.
    captured: [std::sync::Arc<Mutex<Captured>>; 2],
}

/// What a pipe has carried so far, and whether it has closed.
#[derive(Default)]
struct Captured {
    bytes: Vec<u8>,
    closed: bool,
}

impl BoundedRun {
    /// Starts `command` with its output captured.
    pub fn start(mut command: Command) -> BoundedRun {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
        let captured: [std::sync::Arc<Mutex<Captured>>; 2] = Default::default();
        let pipes: [Box<dyn Read + Send>; 2] = [
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        // Read on threads into shared buffers: a process the command left
        // behind may hold the pipes open, and the buffers stay readable.
        for (mut pipe, buffer) in pipes.into_iter().zip(captured.iter().cloned()) {
            std::thread::spawn(move || {
                let mut chunk = [0u8; 8192];
                while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                    lock(&buffer).bytes.extend_from_slice(&chunk[..n]);
                }
                lock(&buffer).closed = true;
            });
        }
        BoundedRun {
            command: format!("{command:?}"),
            child,
            started: Instant::now(),
            captured,
        }
    }

    /// stdout and stderr so far, together.
    pub fn output_so_far(&self) -> String {
        let [stdout, stderr] = &self.captured;
        format!(
            "{}{}",
            String::from_utf8_lossy(&lock(stdout).bytes),
            String::from_utf8_lossy(&lock(stderr).bytes)
        )
    }

    /// Whether the command has exited (its output may still be coming).
    pub fn exited(&mut self) -> bool {
        if self.started.elapsed() > DEADLINE {
            return true; // `wait` fails the test with the output.
        }
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Waits for the command to exit and its output to end, failing the
    /// test if that takes longer than [`DEADLINE`] from its start.
    pub fn wait(mut self) -> Output {
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for a command") {
                break status;
            }
            if self.started.elapsed() > DEADLINE {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "{} did not finish within {} s; killed. Its output:\n{}",
                    self.command,
                    DEADLINE.as_secs(),
                    self.output_so_far()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        // The output ends when the pipes close; a process left holding them
        // fails the test rather than holding it.
        while !self.captured.iter().all(|c| lock(c).closed) {
            assert!(
                self.started.elapsed() < DEADLINE,
                "{} exited ({status}) but something it started kept its output open. Its output:\n{}",
                self.command,
                self.output_so_far()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let [stdout, stderr] = &self.captured;
        let stdout = std::mem::take(&mut lock(stdout).bytes);
        let stderr = std::mem::take(&mut lock(stderr).bytes);
        Output {
            status,
            stdout,
            stderr,
        }
    }
}

impl Drop for BoundedRun {
    /// A run dropped unwaited (its test failed) is ended, not left behind.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn tag(dir: &TestDir) -> String {
    dir.path.display().to_string()
}

/// Pids of live processes started for this test dir (master and workers
/// carry its tag in their environment).
pub fn processes_of(dir: &TestDir) -> Vec<u32> {
    let needle = format!("HOST_TEST_TAG={}", tag(dir));
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let is_ours = environ
            .split(|b| *b == 0)
            .any(|var| var == needle.as_bytes());
        let zombie = std::fs::read_to_string(entry.path().join("stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|rest| rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        if is_ours && !zombie {
            pids.push(pid);
        }
    }
    pids
}

/// Waits until `condition` holds, panicking with `what` after the deadline.
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running master in the foreground, killed (with its workers) on drop.
pub struct Host {
    pub dir: TestDir,
    child: Child,
    pub addr: SocketAddr,
}

impl Host {
    /// Writes `config` as host.toml and starts a master; waits until every
    /// worker is ready.
    pub fn start(dir: TestDir, config: &str) -> Host {
        Self::start_with(dir, config, |_| {})
    }

    /// Like `start`, letting the test adjust the command (environment,
    /// inherited descriptors, a wrapper) before it runs.
    pub fn start_with(dir: TestDir, config: &str, adjust: impl FnOnce(&mut Command)) -> Host {
        dir.write("host.toml", config);
        let log = std::fs::File::create(dir.path.join("master.log")).unwrap();
        let mut command = Command::new(host_bin());
        command
            .current_dir(&dir.path)
            .args(["start", "-c"])
            .arg(dir.path.join("host.toml"))
            .env("HOST_TEST_TAG", tag(&dir))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        adjust(&mut command);
        let child = command.spawn().expect("start host");
        let mut host = Host {
            dir,
            child,
            addr: "127.0.0.1:1".parse().unwrap(),
        };
        host.wait_all_ready();
        host.addr = host.status()["groups"][0]["listen"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        host
    }

    /// The admin address (`admin = "127.0.0.1:0"` in the config).
    pub fn admin(&self) -> String {
        self.status()["admin"]
            .as_str()
            .expect("an admin address in the config")
            .to_owned()
    }

    /// The master's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs a CLI command against this host.
    pub fn cli(&self, args: &[&str]) -> Output {
        host_command(&self.dir, args)
    }

    /// `host status --json`, parsed; `Value::Null` if the master does not answer.
    pub fn try_status(&self) -> Value {
        let output = self.cli(&["status", "--json"]);
        if !output.status.success() {
            return Value::Null;
        }
        serde_json::from_slice(&output.stdout).unwrap_or(Value::Null)
    }

    /// `host status --json`, parsed.
    pub fn status(&self) -> Value {
        let status = self.try_status();
        assert!(
            !status.is_null(),
            "host status failed; log:\n{}",
            self.log()
        );
        status
    }

    /// Waits until every group has all its workers ready and nothing else runs.
    pub fn wait_all_ready(&mut self) {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("host exited ({status}) during start; log:\n{}", self.log());
            }
            let status = self.try_status();
            if !status.is_null() {
                let groups = status["groups"].as_array().unwrap();
                let workers = status["workers"].as_array().unwrap();
                let wanted: u64 = groups.iter().map(|g| g["count"].as_u64().unwrap()).sum();
                let ready = workers.iter().filter(|w| w["state"] == "ready").count() as u64;
                if groups.iter().all(|g| g["ready"] == g["count"])
                    && ready == wanted
                    && workers.len() as u64 == wanted
                {
                    return;
                }
            }
            assert!(
                start.elapsed() < DEADLINE,
                "workers not ready in time; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Pids of the workers, in status order.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.status()["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["pid"].as_u64().unwrap() as u32)
            .collect()
    }

    /// The master's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path.join("master.log")).unwrap_or_default()
    }

    /// Waits for the master process to exit and returns its status.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "master did not exit; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the master to exit (after `host stop`) and hands back its
    /// directory, for a test that starts a new master on the same run dir.
    pub fn into_dir(mut self) -> TestDir {
        self.wait_exit();
        let placeholder = TestDir {
            path: self.dir.path.join("gone"),
        };
        std::mem::replace(&mut self.dir, placeholder)
    }

    /// Sends a signal to the master.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), signal).unwrap();
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        for pid in processes_of(&self.dir) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until no reload runs and every worker (as many as the groups'
/// counts) is ready on `version`.
pub fn wait_serving(host: &Host, version: &str) {
    wait_until(&format!("every worker serves {version}"), || {
        let status = host.try_status();
        let wanted: u64 = status["groups"].as_array().map_or(0, |groups| {
            groups.iter().map(|g| g["count"].as_u64().unwrap()).sum()
        });
        status["reloading"] == false
            && status["workers"].as_array().is_some_and(|workers| {
                workers.len() as u64 == wanted
                    && workers
                        .iter()
                        .all(|w| w["state"] == "ready" && w["handler_version"] == version)
            })
    });
}

/// Every worker is ready and answers with `version`, on fresh connections.
pub fn assert_all_serve(host: &Host, version: &str) {
    let status = host.status();
    for worker in status["workers"].as_array().unwrap() {
        assert_eq!(worker["state"], "ready", "{status}");
        assert_eq!(worker["handler_version"], version, "{status}");
    }
    for _ in 0..20 {
        assert_eq!(get(host.addr, "/version").body, version);
    }
}

/// Keep-alive load on `/version`: `connections` connections sending
/// back-to-back requests until stopped; returns once requests are flowing.
pub fn steady_load(addr: SocketAddr, connections: usize) -> loadgen::LoadRun {
    let mut config = loadgen::LoadConfig::new(addr);
    config.connections = connections;
    config.path = "/version".into();
    config.duration = Duration::from_secs(300);
    let run = loadgen::LoadRun::start(config);
    wait_until("load is flowing", || run.progress().0 > 100);
    run
}

/// Sends a signal to a process.
pub fn kill(pid: u32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).unwrap();
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// A response: status code and body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`).
pub fn request(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> std::io::Result<Reply> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(DEADLINE))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("malformed response {text:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("malformed status line {head:?}")))?;
    Ok(Reply {
        status,
        headers: head.to_owned(),
        body: body.to_owned(),
    })
}

/// A keep-alive connection that has had one `GET path` answered with a
/// body ending in `expect`, and stays open (idle).
pub fn idle_connection(addr: SocketAddr, path: &str, expect: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .unwrap();
    let mut buf = [0u8; 512];
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).ends_with(expect) {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed before the answer: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    stream
}

/// The text of `GET /metrics` on an admin address.
pub fn metrics(admin: &str) -> String {
    get(admin.parse().unwrap(), "/metrics").body
}

/// One sample of `metrics` output, by its name and labels; 0 when absent.
pub fn metric(text: &str, name_and_labels: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)
                .map(|v| v.trim().parse::<f64>().unwrap() as u64)
        })
        .unwrap_or(0)
}

/// `GET path`, expecting an answer.
pub fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path, b"").unwrap_or_else(|e| panic!("GET {path} failed: {e}"))
}

/// Text of a CLI run, stdout and stderr together, for messages.
pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Asserts that a CLI run's text (see [`text`]) contains `needle`, showing
/// the whole text if not.
#[track_caller]
pub fn assert_says(output: &Output, needle: &str) {
    let text = text(output);
    assert!(text.contains(needle), "{text}");
}

/// Kills whatever a test started in a directory (daemonized masters
/// included) when dropped, so a test that fails midway leaves nothing
/// running.
pub struct KillOnDrop<'a>(pub &'a TestDir);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        for pid in processes_of(self.0) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// A port on 127.0.0.1 that was free a moment ago (bound, then released),
/// for a config that must name its port before the host binds it.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
