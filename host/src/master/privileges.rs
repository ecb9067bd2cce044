//! Dropping root: listeners are bound as root, then the master (and so
//! every worker it starts) runs as the configured `user`.
//!
//! The run directory is handed to that user first, so the master can keep
//! writing its store, pins and log, and reopen its log after a rotation.

use std::path::Path;

use anyhow::{bail, Context as _, Result};
use nix::unistd::{Gid, Uid, User};

/// The account to run as, resolved before anything is bound.
pub struct RunAs {
    user: User,
}

impl RunAs {
    /// Resolves `name`; `None` when no change of user is needed.
    pub fn resolve(name: Option<&str>) -> Result<Option<RunAs>> {
        let Some(name) = name else { return Ok(None) };
        let user = User::from_name(name)
            .with_context(|| format!("cannot look up user {name:?}"))?
            .with_context(|| format!("user = {name:?}: no such user"))?;
        let euid = Uid::effective();
        if user.uid == euid {
            return Ok(None);
        }
        if !euid.is_root() {
            bail!("user = {name:?} needs host to be started as root (it runs as uid {euid})");
        }
        Ok(Some(RunAs { user }))
    }

    /// Gives the run directory to the user, then becomes the user.
    pub fn drop_privileges(&self, run_dir: &Path) -> Result<()> {
        chown_tree(run_dir, self.user.uid, self.user.gid)?;
        nix::unistd::setgroups(&[self.user.gid]).context("setgroups")?;
        nix::unistd::setgid(self.user.gid).context("setgid")?;
        nix::unistd::setuid(self.user.uid).context("setuid")?;
        tracing::info!(user = %self.user.name, uid = self.user.uid.as_raw(), "dropped root privileges");
        Ok(())
    }
}

fn chown_tree(path: &Path, uid: Uid, gid: Gid) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(uid.as_raw()), Some(gid.as_raw()))
        .with_context(|| format!("cannot give {} to uid {uid}", path.display()))?;
    if path.is_dir() && !path.is_symlink() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}
