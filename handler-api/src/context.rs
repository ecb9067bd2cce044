//! What a worker hands its handler at start: identity, settings, logging.

use abi_stable::{
    std_types::{RSlice, RStr},
    StableAbi,
};

/// Log levels understood by the host's logging callback.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Something failed.
    Error,
    /// Something looks wrong.
    Warn,
    /// A normal event worth a line.
    Info,
    /// Detail for debugging.
    Debug,
}

/// The host's logging callback. Each library has its own copy of every
/// global (logger, panic hook, allocator), so logs go through the host.
pub type LogFn = extern "C" fn(level: Level, message: RStr<'_>);

/// One `key = value` from the group's `[group.settings]` table.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct Setting<'a> {
    /// The key.
    pub key: RStr<'a>,
    /// The value, as text.
    pub value: RStr<'a>,
}

/// The raw start context passed across the boundary.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct StartContext<'a> {
    /// Name of the worker's group.
    pub group: RStr<'a>,
    /// Slot of the worker in its group, from 0.
    pub slot: u32,
    /// Process id of the worker.
    pub pid: u32,
    /// The group's handler settings.
    pub settings: RSlice<'a, Setting<'a>>,
    /// Logging into the host's log, tagged with this worker.
    pub log: extern "C" fn(level: Level, message: RStr<'_>),
}

/// The safe view of [`StartContext`] given to [`crate::Handler::start`].
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    raw: &'a StartContext<'a>,
}

impl<'a> Context<'a> {
    /// Wraps the raw context.
    pub fn new(raw: &'a StartContext<'a>) -> Self {
        Context { raw }
    }

    /// Name of the worker's group.
    pub fn group(&self) -> &'a str {
        self.raw.group.as_str()
    }

    /// Slot of the worker in its group, from 0.
    pub fn slot(&self) -> u32 {
        self.raw.slot
    }

    /// Process id of the worker.
    pub fn pid(&self) -> u32 {
        self.raw.pid
    }

    /// The value of a handler setting, if the config sets it.
    pub fn setting(&self, key: &str) -> Option<&'a str> {
        self.raw
            .settings
            .as_slice()
            .iter()
            .find(|s| s.key.as_str() == key)
            .map(|s| s.value.as_str())
    }

    /// A logger that writes into the host's log; keep it for later calls.
    pub fn logger(&self) -> Logger {
        Logger { log: self.raw.log }
    }
}

/// Writes into the host's log. Cheap to copy; valid for the whole process.
#[derive(Debug, Clone, Copy)]
pub struct Logger {
    log: LogFn,
}

impl Logger {
    /// Logs at `level`.
    pub fn log(&self, level: Level, message: &str) {
        (self.log)(level, message.into())
    }

    /// Logs an error.
    pub fn error(&self, message: &str) {
        self.log(Level::Error, message)
    }

    /// Logs a warning.
    pub fn warn(&self, message: &str) {
        self.log(Level::Warn, message)
    }

    /// Logs an informational line.
    pub fn info(&self, message: &str) {
        self.log(Level::Info, message)
    }

    /// Logs a debug line.
    pub fn debug(&self, message: &str) {
        self.log(Level::Debug, message)
    }
}
