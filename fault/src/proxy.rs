//! A TCP proxy between clients (agents, syncers) and the broker that can pass, delay,
//! blackhole, refuse and reset connections: network faults without any external tool.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward everything.
    Pass,
    /// Forward every chunk after this delay (a slow or far link).
    Delay(Duration),
    /// Accept and swallow everything, answer nothing, close nothing: a half-open path.
    Blackhole,
    /// Close new connections at once (existing ones follow the other modes' rules: they pass).
    Refuse,
}

pub struct Proxy {
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
    resets: watch::Sender<u64>,
    open: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        // Open connections end with the proxy.
        self.resets.send_modify(|n| *n += 1);
    }
}

impl Proxy {
    /// A proxy on 127.0.0.1 (any port) to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, mode_rx) = watch::channel(Mode::Pass);
        let (resets, resets_rx) = watch::channel(0u64);
        let open = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (o, a) = (Arc::clone(&open), Arc::clone(&accepted));
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { continue };
                a.fetch_add(1, Ordering::Relaxed);
                if *mode_rx.borrow() == Mode::Refuse {
                    drop(client);
                    continue;
                }
                let (mode, resets, open) = (mode_rx.clone(), resets_rx.clone(), Arc::clone(&o));
                tokio::spawn(async move {
                    open.fetch_add(1, Ordering::Relaxed);
                    connection(client, target, mode, resets).await;
                    open.fetch_sub(1, Ordering::Relaxed);
                });
            }
        });
        Proxy { addr, mode, resets, open, accepted, task }
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Resets (TCP RST) every open connection.
    pub fn reset_all(&self) {
        self.resets.send_modify(|n| *n += 1);
    }

    /// Connections open through the proxy now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections accepted since the start (including refused ones).
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

async fn connection(
    client: TcpStream,
    target: SocketAddr,
    mode: watch::Receiver<Mode>,
    mut resets: watch::Receiver<u64>,
) {
    let Ok(upstream) = TcpStream::connect(target).await else { return };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    // Duplicates of both sockets, to reset them from here while the pumps own the halves.
    let (Ok(client_fd), Ok(upstream_fd)) = (dup(&client), dup(&upstream)) else { return };
    // `io::split`, not `into_split`: dropping these halves does not send FIN, so a reset
    // below is a clean RST.
    let (cr, cw) = tokio::io::split(client);
    let (ur, uw) = tokio::io::split(upstream);
    let mut pumps = tokio::spawn(async move { tokio::join!(pump(cr, uw, mode.clone()), pump(ur, cw, mode)) });
    resets.borrow_and_update();
    tokio::select! {
        _ = &mut pumps => {}
        _ = resets.changed() => {
            // Linger 0 first: the last close of each socket then sends RST instead of FIN.
            let _ = socket2::SockRef::from(&client_fd).set_linger(Some(Duration::ZERO));
            let _ = socket2::SockRef::from(&upstream_fd).set_linger(Some(Duration::ZERO));
            pumps.abort();
            let _ = pumps.await;
        }
    }
}

fn dup(s: &TcpStream) -> std::io::Result<socket2::Socket> {
    socket2::SockRef::from(s).try_clone()
}

async fn pump<R, W>(mut from: R, mut to: W, mode: watch::Receiver<Mode>)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let current = *mode.borrow();
        match current {
            Mode::Pass | Mode::Refuse => {}
            Mode::Delay(d) => tokio::time::sleep(d).await,
            Mode::Blackhole => continue,
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    if *mode.borrow() == Mode::Blackhole {
        // A partition does not carry the FIN either: the far end keeps a half-open connection
        // until its own keepalive (or a reset) ends it.
        std::future::pending::<()>().await;
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn roundtrip(s: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
        s.write_all(b"ping").await.ok()?;
        let mut buf = [0u8; 4];
        match tokio::time::timeout(within, s.read_exact(&mut buf)).await {
            Ok(Ok(_)) => Some(buf.to_vec()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn passes_delays_blackholes_refuses_and_resets() {
        let proxy = Proxy::start(echo_server().await).await;
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(roundtrip(&mut s, Duration::from_secs(2)).await.unwrap(), b"ping");

        proxy.set(Mode::Delay(Duration::from_millis(300)));
        let t = std::time::Instant::now();
        assert!(roundtrip(&mut s, Duration::from_secs(3)).await.is_some());
        assert!(t.elapsed() >= Duration::from_millis(600), "both directions delayed: {:?}", t.elapsed());

        proxy.set(Mode::Blackhole);
        assert!(roundtrip(&mut s, Duration::from_millis(500)).await.is_none(), "nothing comes back");
        assert_eq!(proxy.open_connections(), 1, "and nothing is closed");

        proxy.set(Mode::Refuse);
        let mut refused = TcpStream::connect(proxy.addr).await.unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(refused.read(&mut buf).await.unwrap_or(0), 0, "closed at once");

        proxy.set(Mode::Pass);
        let mut fresh = TcpStream::connect(proxy.addr).await.unwrap();
        assert!(roundtrip(&mut fresh, Duration::from_secs(2)).await.is_some());
        proxy.reset_all();
        let err = loop {
            match fresh.read(&mut buf).await {
                Ok(0) => break None,
                Ok(_) => continue,
                Err(e) => break Some(e.kind()),
            }
        };
        assert_eq!(err, Some(std::io::ErrorKind::ConnectionReset));
    }
}
