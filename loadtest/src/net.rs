//! Thin safe wrappers over the libc calls the subscriber loop needs:
//! nonblocking sockets bound to a chosen source address, epoll, and the
//! monotonic clock shared with the publisher (and across processes).

use std::io;
use std::mem;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// CLOCK_MONOTONIC in nanoseconds (the same clock in every process on the machine).
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero bytes are a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { (&mut storage as *mut libc::sockaddr_storage as *mut libc::sockaddr_in).write(sin) };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { (&mut storage as *mut libc::sockaddr_storage as *mut libc::sockaddr_in6).write(sin6) };
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn set_int_opt(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &value as *const libc::c_int as *const libc::c_void,
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Starts a nonblocking TCP connect to `dst`, optionally from source address `src`.
///
/// With a source address the port is chosen at connect time
/// (`IP_BIND_ADDRESS_NO_PORT`), so each source address offers a full ephemeral
/// port range towards the destination.
pub fn start_connect(dst: &SocketAddr, src: Option<Ipv4Addr>) -> io::Result<OwnedFd> {
    let family = if dst.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket(2) call; the result is checked.
    let raw = cvt(unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `raw` is a freshly created descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    if let (Some(src), true) = (src, dst.is_ipv4()) {
        set_int_opt(raw, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)?;
        let (sa, len) = sockaddr(&SocketAddr::from((src, 0)));
        // SAFETY: `sa` holds a valid sockaddr of length `len`.
        cvt(unsafe { libc::bind(raw, &sa as *const _ as *const libc::sockaddr, len) })?;
    }
    let (sa, len) = sockaddr(dst);
    // SAFETY: `sa` holds a valid sockaddr of length `len`.
    let ret = unsafe { libc::connect(raw, &sa as *const _ as *const libc::sockaddr, len) };
    if ret < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(err);
        }
    }
    Ok(fd)
}

/// The pending error of a socket (`SO_ERROR`), e.g. the outcome of a nonblocking connect.
pub fn take_socket_error(fd: RawFd) -> io::Result<()> {
    let mut err: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: passes a pointer to a live c_int and its size.
    cvt(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            &mut err as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    })?;
    if err == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(err))
    }
}

pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

pub fn write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes; MSG_NOSIGNAL avoids SIGPIPE.
    let n = unsafe { libc::send(fd, buf.as_ptr() as *const libc::c_void, buf.len(), libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

pub const EPOLLIN: u32 = libc::EPOLLIN as u32;
pub const EPOLLOUT: u32 = libc::EPOLLOUT as u32;
pub const EPOLLERR: u32 = libc::EPOLLERR as u32;
pub const EPOLLHUP: u32 = libc::EPOLLHUP as u32;
pub const EPOLLRDHUP: u32 = libc::EPOLLRDHUP as u32;
pub const EPOLLET: u32 = libc::EPOLLET as u32;

/// An epoll instance.
pub struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: plain epoll_create1(2) call; the result is checked.
        let raw = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: `raw` is a freshly created descriptor owned by nobody else.
        Ok(Epoll { fd: unsafe { OwnedFd::from_raw_fd(raw) } })
    }

    pub fn add(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a valid epoll_event.
        cvt(unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) }).map(drop)
    }

    /// Waits up to `timeout_ms`; fills `events` (its capacity is the batch size).
    pub fn wait(&self, events: &mut Vec<libc::epoll_event>, timeout_ms: i32) -> io::Result<()> {
        events.clear();
        let cap = events.capacity().min(i32::MAX as usize) as i32;
        // SAFETY: `events` has room for `cap` entries; its length is set to what the kernel wrote.
        let n = unsafe { libc::epoll_wait(self.fd.as_raw_fd(), events.as_mut_ptr(), cap, timeout_ms) };
        if n < 0 {
            let err = io::Error::last_os_error();
            return if err.kind() == io::ErrorKind::Interrupted { Ok(()) } else { Err(err) };
        }
        // SAFETY: the kernel initialised the first `n` entries.
        unsafe { events.set_len(n as usize) };
        Ok(())
    }
}

/// CPU time (user + system) this process and its waited-for children used, in seconds.
pub fn own_cpu_seconds() -> f64 {
    fn secs(who: libc::c_int) -> f64 {
        // SAFETY: all-zero bytes are a valid rusage; getrusage fills it.
        let mut ru: libc::rusage = unsafe { mem::zeroed() };
        // SAFETY: `ru` is a valid, writable rusage.
        unsafe { libc::getrusage(who, &mut ru) };
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(ru.ru_utime) + tv(ru.ru_stime)
    }
    secs(libc::RUSAGE_SELF)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    #[test]
    fn connect_from_source_address_and_epoll() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let dst = listener.local_addr().unwrap();
        let fd = start_connect(&dst, Some(Ipv4Addr::new(127, 0, 0, 2))).unwrap();
        let ep = Epoll::new().unwrap();
        ep.add(fd.as_raw_fd(), EPOLLIN | EPOLLOUT | EPOLLET, 7).unwrap();
        let (mut peer, peer_addr) = listener.accept().unwrap();
        assert_eq!(peer_addr.ip(), std::net::IpAddr::from([127, 0, 0, 2]));
        let mut events = Vec::with_capacity(8);
        ep.wait(&mut events, 1000).unwrap();
        assert_eq!(events.len(), 1);
        let token = events[0].u64;
        assert_eq!(token, 7);
        take_socket_error(fd.as_raw_fd()).unwrap();
        assert_eq!(write(fd.as_raw_fd(), b"ping").unwrap(), 4);
        let mut buf = [0u8; 4];
        peer.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        peer.write_all(b"pong").unwrap();
        ep.wait(&mut events, 1000).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(read(fd.as_raw_fd(), &mut buf).unwrap(), 4);
        assert_eq!(&buf, b"pong");
        let err = read(fd.as_raw_fd(), &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        let a = mono_ns();
        assert!(mono_ns() >= a);
    }
}
