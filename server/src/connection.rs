//! The hard end of each accepted connection, at `--max-connection-age-secs` plus its grace.
//!
//! tonic 0.14's own `max_connection_age_grace` never sends the GOAWAY: with a grace set it
//! sleeps age + grace and then drops the connection with its calls in flight (clients saw
//! "transport error" / "Stream removed"; tests/connections.rs counted 8 of 2553 calls failed
//! over two rollovers). So tonic is given the age alone, which makes hyper send GOAWAY and let
//! the calls in flight finish while the client reconnects, and this wrapper closes the socket
//! at age + grace if calls are still running then (a client that never finishes).

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tonic::transport::server::Connected;

/// A connection's I/O that fails once its hard end has passed, which ends the connection.
pub struct HardEnd<IO> {
    io: IO,
    end: Option<Pin<Box<Sleep>>>,
}

impl<IO> HardEnd<IO> {
    /// `after`: how long the connection may live from now (None: no end).
    pub fn new(io: IO, after: Option<Duration>) -> Self {
        Self { io, end: after.map(|d| Box::pin(tokio::time::sleep(d))) }
    }

    /// An error once the end has passed; otherwise registers the waker for it, so that a
    /// connection waiting to read is woken at its end.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let ended = self.end.as_mut().is_some_and(|end| end.as_mut().poll(cx).is_ready());
        if ended {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection past --max-connection-age-secs and its grace; closed with calls still running",
            ));
        }
        Ok(())
    }
}

impl<IO: Connected> Connected for HardEnd<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for HardEnd<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for HardEnd<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn reads_and_writes_fail_once_the_end_has_passed() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut io = HardEnd::new(a, Some(Duration::from_millis(50)));
        b.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        io.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hi");
        // A read waiting on a quiet peer is woken by the end.
        let started = std::time::Instant::now();
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(io.write(b"x").await.unwrap_err().kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn without_an_end_nothing_changes() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut io = HardEnd::new(a, None);
        tokio::time::sleep(Duration::from_millis(20)).await;
        io.write_all(b"ok").await.unwrap();
        let mut buf = [0u8; 2];
        b.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ok");
    }
}
