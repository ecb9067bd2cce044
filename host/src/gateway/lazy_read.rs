//! A buffered reader whose buffer exists only while it holds unread bytes,
//! so that an idle client costs no read buffer at all.
//!
//! Each read from the socket goes into one scratch buffer per thread
//! ([`SCRATCH`] bytes, so a burst is still one syscall); what the caller
//! does not take at once is copied to a buffer of exactly that size, freed
//! when it has been consumed. Writes pass through.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf};

/// Bytes one read from the socket may bring.
const SCRATCH: usize = 16 << 10;

thread_local! {
    static SCRATCH_BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH].into_boxed_slice());
}

/// `inner`, read through a buffer allocated only while it holds data.
pub struct LazyRead<S> {
    inner: S,
    buffer: Vec<u8>,
    start: usize,
}

impl<S> LazyRead<S> {
    /// Reads `inner`, with no buffer yet.
    pub fn new(inner: S) -> LazyRead<S> {
        LazyRead {
            inner,
            buffer: Vec::new(),
            start: 0,
        }
    }

    fn unread(&self) -> &[u8] {
        &self.buffer[self.start..]
    }
}

impl<S: AsyncRead + Unpin> LazyRead<S> {
    /// Reads from `inner` into the scratch buffer, keeps what came.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        SCRATCH_BUFFER.with_borrow_mut(|scratch| {
            let mut read = ReadBuf::new(scratch);
            ready!(Pin::new(&mut self.inner).poll_read(cx, &mut read))?;
            self.buffer = read.filled().to_vec();
            self.start = 0;
            Poll::Ready(Ok(()))
        })
    }
}

impl<S: AsyncRead + Unpin> AsyncBufRead for LazyRead<S> {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        if this.unread().is_empty() {
            ready!(this.poll_fill(cx))?;
        }
        Poll::Ready(Ok(this.unread()))
    }

    fn consume(self: Pin<&mut Self>, amount: usize) {
        let this = self.get_mut();
        this.start = (this.start + amount).min(this.buffer.len());
        if this.start == this.buffer.len() {
            this.buffer = Vec::new();
            this.start = 0;
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for LazyRead<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.unread().is_empty() && out.remaining() >= SCRATCH {
            return Pin::new(&mut self.inner).poll_read(cx, out);
        }
        let unread = ready!(self.as_mut().poll_fill_buf(cx))?;
        let taken = unread.len().min(out.remaining());
        out.put_slice(&unread[..taken]);
        self.consume(taken);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for LazyRead<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, data)
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn bytes_come_out_in_order_and_the_buffer_goes_once_read() {
        let (mut tx, rx) = tokio::io::duplex(64 << 10);
        let mut reader = LazyRead::new(rx);
        tx.write_all(b"one\ntwo\nthree").await.unwrap();
        let mut line = Vec::new();
        reader.read_until(b'\n', &mut line).await.unwrap();
        assert_eq!(line, b"one\n");
        assert!(!reader.buffer.is_empty(), "the rest waits in the buffer");
        let mut small = [0u8; 3];
        reader.read_exact(&mut small).await.unwrap();
        assert_eq!(&small, b"two");
        let mut rest = vec![0u8; 6];
        reader.read_exact(&mut rest).await.unwrap();
        assert_eq!(rest, b"\nthree");
        assert_eq!(reader.buffer.capacity(), 0, "nothing unread: no buffer");

        let big: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let writer = tokio::spawn(async move {
            tx.write_all(&big).await.unwrap();
            big
        });
        let mut got = Vec::new();
        let mut chunk = [0u8; 1000];
        while got.len() < 100_000 {
            let n = reader.read(&mut chunk).await.unwrap();
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, writer.await.unwrap());
        assert_eq!(reader.buffer.capacity(), 0);
    }
}
