//! The spread table: how many connections each worker of a listener holds,
//! in shared memory every worker of that listener maps.
//!
//! All workers of a group accept from one listening socket. Whichever
//! worker wins the accept keeps a keep-alive connection for its lifetime,
//! so without a rule one worker can end up with 60 % of the connections and
//! saturate while another idles. The rule here: a worker offers to accept
//! only while it holds no more than the group's average of open connections
//! (`own * accepting_workers <= total`). The worker with the fewest
//! connections always qualifies, so the group never stops accepting.
//!
//! The master creates one table per listening socket and hands it to each
//! worker (fd 6); a worker claims a free seat by its pid, counts its open
//! connections in it, and gives it back on exit. A seat whose process died
//! without giving it back is swept by the others (`sweep_dead`).
//!
//! A worker above the average stops polling its accept until a close of
//! its own or a short timer (others' accepts raise the average without
//! telling it). If connections still wait in the listener's queue at five
//! timer ticks in a row, it takes one anyway: every worker below the
//! average may be stuck in a long handler call (`worker/server.rs`,
//! `accept_loop`). Fewer workers trying each accept also means fewer
//! `accept4` calls that find the queue already empty.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context as _, Result};
use memmap2::{MmapMut, MmapOptions};

/// Seats in a table: the most workers one listener can spread over.
const SEATS: usize = 128;

/// One worker's place in the table, on a cache line of its own (only its
/// worker writes it).
#[repr(C, align(64))]
#[derive(Debug, Default)]
struct Seat {
    /// The worker's pid; 0 when free.
    pid: AtomicU32,
    /// 1 while the worker accepts (not draining).
    accepting: AtomicU32,
    /// Open connections.
    connections: AtomicU32,
}

/// The shared table.
#[repr(C)]
struct Table {
    header: Header,
    seats: [Seat; SEATS],
}

/// The table's first cache line.
#[repr(C, align(64))]
struct Header {
    /// One past the highest seat ever claimed: readers scan only that far.
    used: AtomicU32,
}

/// What a worker should do about accepting, from one reading of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// At or below the average: offer to accept.
    Accept,
    /// Above it: leave new connections to the others.
    Wait,
}

/// A mapping of one listener's table.
pub struct SpreadTable {
    map: MmapMut,
}

impl SpreadTable {
    /// Creates an empty table; the fd is for the workers.
    pub fn create() -> Result<OwnedFd> {
        let fd =
            nix::sys::memfd::memfd_create(c"host-spread", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .context("memfd_create")?;
        let file = std::fs::File::from(fd);
        file.set_len(std::mem::size_of::<Table>() as u64)
            .context("cannot size the spread table")?;
        Ok(file.into())
    }

    /// Maps a table created by the master.
    pub fn open(fd: impl AsFd) -> Result<SpreadTable> {
        let file = std::fs::File::from(fd.as_fd().try_clone_to_owned()?);
        // SAFETY: the memfd is only ever accessed through atomics.
        let map = unsafe {
            MmapOptions::new()
                .len(std::mem::size_of::<Table>())
                .map_mut(&file)
        }
        .context("cannot map the spread table")?;
        Ok(SpreadTable { map })
    }

    fn table(&self) -> &Table {
        // SAFETY: the mapping is page-aligned, as large as `Table`,
        // zero-initialised (a valid value of atomics), and lives as long as
        // `self`.
        unsafe { &*(self.map.as_ptr() as *const Table) }
    }

    /// The seats ever claimed.
    fn seats(&self) -> &[Seat] {
        let table = self.table();
        let used = table.header.used.load(Ordering::SeqCst) as usize;
        &table.seats[..used.min(SEATS)]
    }

    /// Takes a free seat for `pid`, or `None` if all are taken.
    pub fn claim(&self, pid: u32) -> Option<usize> {
        let seats = &self.table().seats;
        let index = seats.iter().position(|seat| {
            seat.pid
                .compare_exchange(0, pid, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        })?;
        self.table()
            .header
            .used
            .fetch_max(index as u32 + 1, Ordering::SeqCst);
        let seat = &seats[index];
        seat.connections.store(0, Ordering::SeqCst);
        seat.accepting.store(1, Ordering::SeqCst);
        Some(index)
    }

    /// Gives a seat back (its worker is leaving).
    pub fn release(&self, index: usize) {
        let seat = &self.table().seats[index];
        seat.accepting.store(0, Ordering::SeqCst);
        seat.connections.store(0, Ordering::SeqCst);
        seat.pid.store(0, Ordering::SeqCst);
    }

    /// The worker stops accepting: the others no longer wait for it.
    pub fn leave(&self, index: usize) {
        self.table().seats[index]
            .accepting
            .store(0, Ordering::SeqCst);
    }

    /// One more open connection in `index`.
    pub fn opened(&self, index: usize) {
        self.table().seats[index]
            .connections
            .fetch_add(1, Ordering::Relaxed);
    }

    /// One connection fewer in `index`.
    pub fn closed(&self, index: usize) {
        self.table().seats[index]
            .connections
            .fetch_sub(1, Ordering::Relaxed);
    }

    /// Open connections in `index`.
    fn connections(&self, index: usize) -> u32 {
        self.table().seats[index]
            .connections
            .load(Ordering::Relaxed)
    }

    /// Whether the worker in `index` should offer to accept now.
    pub fn turn(&self, index: usize) -> Turn {
        let (total, accepting) = self.load();
        let own = u64::from(self.connections(index));
        if own * accepting <= total {
            Turn::Accept
        } else {
            Turn::Wait
        }
    }

    /// Total open connections and number of accepting workers.
    fn load(&self) -> (u64, u64) {
        let mut total = 0;
        let mut accepting = 0;
        for seat in self.seats() {
            if seat.accepting.load(Ordering::Relaxed) == 1 {
                total += u64::from(seat.connections.load(Ordering::Relaxed));
                accepting += 1;
            }
        }
        (total, accepting.max(1))
    }

    /// Frees seats whose process is gone without giving them back (a
    /// crash); their connections died with it.
    pub fn sweep_dead(&self) {
        for seat in self.seats() {
            let pid = seat.pid.load(Ordering::SeqCst);
            if pid == 0 || pid_alive(pid) {
                continue;
            }
            seat.accepting.store(0, Ordering::SeqCst);
            seat.connections.store(0, Ordering::SeqCst);
            let _ = seat
                .pid
                .compare_exchange(pid, 0, Ordering::SeqCst, Ordering::SeqCst);
        }
    }
}

fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    let result = unsafe { libc::kill(pid, 0) };
    result == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> SpreadTable {
        SpreadTable::open(SpreadTable::create().unwrap()).unwrap()
    }

    #[test]
    fn only_workers_at_or_below_the_average_accept() {
        let table = table();
        let a = table.claim(1).unwrap();
        let b = table.claim(2).unwrap();
        assert_eq!(table.turn(a), Turn::Accept);
        table.opened(a);
        assert_eq!(table.turn(a), Turn::Wait);
        assert_eq!(table.turn(b), Turn::Accept);
        table.opened(b);
        assert_eq!(table.turn(a), Turn::Accept);
        table.closed(b);
        assert_eq!(table.turn(a), Turn::Wait);
    }

    #[test]
    fn a_worker_that_left_no_longer_counts() {
        let table = table();
        let a = table.claim(1).unwrap();
        let b = table.claim(2).unwrap();
        table.opened(a);
        table.opened(a);
        assert_eq!(table.turn(a), Turn::Wait);
        table.leave(b);
        assert_eq!(table.turn(a), Turn::Accept);
        table.release(b);
        assert_eq!(table.claim(3), Some(b), "a released seat is free again");
    }

    #[test]
    fn a_dead_workers_seat_is_swept() {
        let table = table();
        // A pid that cannot exist (above the kernel's pid_max limit).
        let dead = table.claim(1 << 30).unwrap();
        let live = table.claim(std::process::id()).unwrap();
        table.opened(live);
        assert_eq!(table.turn(live), Turn::Wait);
        table.sweep_dead();
        assert_eq!(table.turn(live), Turn::Accept);
        assert_eq!(table.claim(4), Some(dead));
    }
}
