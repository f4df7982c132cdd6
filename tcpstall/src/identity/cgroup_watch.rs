//! Whether the cgroup2 hierarchy changed since the last walk: one inotify
//! watch per walked directory for a child cgroup created, removed or
//! renamed (`mkdir`/`rmdir` on cgroupfs notify like any directory). Lets
//! the guard skip its per-tick walk of the whole tree on a node whose pods
//! do not change. Not a guarantee (a cgroup made through another mount of
//! the hierarchy notifies that mount's inodes only), so callers still walk
//! now and then.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

/// Child directories created, removed, moved in or out; and the watched
/// directory itself removed or moved.
const MASK: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_ONLYDIR;

/// An inotify instance watching a set of directories.
pub struct CgroupWatch {
    fd: OwnedFd,
}

impl CgroupWatch {
    /// Watches every directory in `dirs`. None if inotify or any one watch
    /// is refused (e.g. `fs.inotify.max_user_watches` reached): the caller
    /// then cannot rely on [`Self::changed`] and walks every time.
    pub fn new<'a>(dirs: impl IntoIterator<Item = &'a Path>) -> Option<Self> {
        // SAFETY: plain syscall; the fd is owned below.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return None;
        }
        // SAFETY: a fresh fd of ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        for dir in dirs {
            let mut c = dir.as_os_str().as_bytes().to_vec();
            c.push(0);
            // SAFETY: `c` is NUL terminated and outlives the call.
            let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr().cast(), MASK) };
            if wd < 0 {
                return None;
            }
        }
        Some(Self { fd })
    }

    /// Whether anything happened to a watched directory since the last
    /// call (drains what the kernel queued; a queue overflow counts too).
    pub fn changed(&self) -> bool {
        let mut buf = [0u8; 4096];
        let mut any = false;
        loop {
            // SAFETY: reads into our buffer.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                any = true;
                continue;
            }
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock {
                return any;
            }
            // EOF or an error: cannot tell, so say changed.
            return true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory made or removed anywhere in the watched tree, or a
    /// watched directory renamed, is reported once; nothing else is.
    /// Mutation: `IN_CREATE` dropped from `MASK` misses the new
    /// subdirectory (`left: false`).
    #[test]
    fn reports_child_directories_made_and_removed() {
        let root = std::env::temp_dir().join(format!("tcpstall-cgw-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let deep = root.join("kubepods").join("pod1");
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::write(deep.join("cgroup.procs"), b"").unwrap();
        let dirs = [root.clone(), root.join("kubepods"), deep.clone()];
        let w = CgroupWatch::new(dirs.iter().map(|p| p.as_path())).expect("inotify");
        assert!(!w.changed(), "nothing happened yet");
        std::fs::write(deep.join("cgroup.procs"), b"1").unwrap();
        assert!(!w.changed(), "a control file written is not a cgroup made");
        std::fs::create_dir(deep.join("ctr")).unwrap();
        assert!(w.changed(), "a container cgroup made under a pod");
        assert!(!w.changed(), "reported once");
        std::fs::remove_dir(deep.join("ctr")).unwrap();
        assert!(w.changed(), "a cgroup removed");
        std::fs::rename(&deep, root.join("kubepods").join("pod2")).unwrap();
        assert!(w.changed(), "a cgroup moved");
        assert!(CgroupWatch::new([root.join("absent").as_path()]).is_none());
        let _ = std::fs::remove_dir_all(&root);
    }
}
