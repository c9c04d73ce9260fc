//! A TCP proxy between uplink and a dependency, controlled by the test: forward, cut (drop
//! every connection and refuse new ones) or stall (keep connections open but stop moving
//! bytes), to inject broker and database outages into real components.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Forward,
    Cut,
    Stall,
}

pub struct Proxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free local port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (mode, rx) = watch::channel(Mode::Forward);
        let rx = Arc::new(rx);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    break;
                };
                let rx = (*rx).clone();
                tokio::spawn(async move {
                    if *rx.borrow() == Mode::Cut {
                        return; // dropping the socket closes it
                    }
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    pipe(client, server, rx).await;
                });
            }
        });
        Self { addr, mode, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    pub fn cut(&self) {
        self.set(Mode::Cut);
    }

    pub fn stall(&self) {
        self.set(Mode::Stall);
    }

    pub fn restore(&self) {
        self.set(Mode::Forward);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.set(Mode::Cut);
        self.task.abort();
    }
}

async fn pipe(client: TcpStream, server: TcpStream, rx: watch::Receiver<Mode>) {
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let a = tokio::spawn(copy(cr, sw, rx.clone()));
    let b = tokio::spawn(copy(sr, cw, rx));
    let _ = tokio::join!(a, b);
}

/// Copies bytes one way, honouring the mode: stalls (holding the bytes) while stalled, and
/// closes as soon as the proxy is cut.
async fn copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut rx: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if !wait_until_forwarding(&mut rx).await {
            return;
        }
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            read = from.read(&mut buf) => {
                let n = match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                // Bytes read just before a stall are held until the mode changes.
                if !wait_until_forwarding(&mut rx).await {
                    return;
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Waits while the proxy is stalled; false once it is cut (or dropped).
async fn wait_until_forwarding(rx: &mut watch::Receiver<Mode>) -> bool {
    loop {
        let mode = *rx.borrow_and_update();
        match mode {
            Mode::Forward => return true,
            Mode::Cut => return false,
            Mode::Stall => {
                if rx.changed().await.is_err() {
                    return false;
                }
            }
        }
    }
}
