//! Noticing clients that go away mid-request, so their jobs are cancelled.
//!
//! hyper reads the socket while a handler runs and sees the EOF of a client that closed its
//! connection, but poem then keeps driving that connection, and so the handler, to completion
//! (it awaits the connection again for a graceful close): the handler future is not dropped.
//! (`tests/server.rs` checks the behaviour end to end.) So every accepted socket is wrapped in a
//! [`WatchedStream`] that raises a flag when a read hits EOF or an error, and a handler looks
//! its connection's flag up by the client's address and hands it to the engine, which checks it
//! before a job starts and between denoising steps.
//!
//! A client that half-closes (shuts down its write side) while waiting counts as gone, as it
//! does for hyper's own default (`half_close(false)`).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use poem::http::uri::Scheme;
use poem::listener::{Acceptor, TcpAcceptor};
use poem::web::{LocalAddr, RemoteAddr};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

type Flags = Arc<Mutex<HashMap<SocketAddr, Arc<AtomicBool>>>>;

/// The open connections' "client gone" flags, by client address.
#[derive(Clone, Default)]
pub struct Connections {
    flags: Flags,
}

impl Connections {
    /// The flag raised when the connection from `remote` is closed by the client.
    pub fn client_gone(&self, remote: &RemoteAddr) -> Option<Arc<AtomicBool>> {
        let addr = remote.as_socket_addr()?;
        lock(&self.flags).get(addr).cloned()
    }
}

fn lock(flags: &Flags) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Arc<AtomicBool>>> {
    // Nothing panics while holding the lock; a poisoned map is still a valid map.
    flags.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A TCP acceptor whose connections report their client going away.
pub struct WatchedAcceptor {
    inner: TcpAcceptor,
    connections: Connections,
}

impl WatchedAcceptor {
    pub fn new(inner: TcpAcceptor, connections: Connections) -> Self {
        WatchedAcceptor { inner, connections }
    }
}

impl Acceptor for WatchedAcceptor {
    type Io = WatchedStream;

    fn local_addr(&self) -> Vec<LocalAddr> {
        self.inner.local_addr()
    }

    async fn accept(&mut self) -> io::Result<(Self::Io, LocalAddr, RemoteAddr, Scheme)> {
        let (stream, local, remote, scheme) = self.inner.accept().await?;
        let peer = stream.peer_addr()?;
        let gone = Arc::new(AtomicBool::new(false));
        lock(&self.connections.flags).insert(peer, gone.clone());
        let stream = WatchedStream {
            inner: stream,
            peer,
            gone,
            flags: self.connections.flags.clone(),
        };
        Ok((stream, local, remote, scheme))
    }
}

/// A client connection that raises its flag when a read sees EOF or fails.
pub struct WatchedStream {
    inner: TcpStream,
    peer: SocketAddr,
    gone: Arc<AtomicBool>,
    flags: Flags,
}

impl AsyncRead for WatchedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let wanted = buf.remaining() > 0;
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let eof = matches!(result, Poll::Ready(Ok(()))) && wanted && buf.filled().len() == before;
        if eof || matches!(result, Poll::Ready(Err(_))) {
            self.gone.store(true, Ordering::Relaxed);
        }
        result
    }
}

impl AsyncWrite for WatchedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Drop for WatchedStream {
    fn drop(&mut self) {
        // The connection is over either way.
        self.gone.store(true, Ordering::Relaxed);
        let mut flags = lock(&self.flags);
        // Only our own entry: a new connection may already reuse the address.
        if flags
            .get(&self.peer)
            .is_some_and(|f| Arc::ptr_eq(f, &self.gone))
        {
            flags.remove(&self.peer);
        }
    }
}
