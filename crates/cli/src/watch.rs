//! Watching a running host: `--metrics ADDR` (`OpenMetrics` over HTTP on loopback) and the stats
//! socket next to the host's socket (`iopf inspect --socket`).

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use iopf_endpoint::Host;
use iopf_host::metrics::{self, MetricsServer, StatsSocket};

/// What serves a host's live view; dropping it stops serving.
#[derive(Debug)]
pub(crate) struct Watch {
    _http: Option<MetricsServer>,
    _stats: Option<StatsSocket>,
}

/// Refuses a `--metrics` address that is not loopback, before anything starts.
pub(crate) fn check(addr: Option<SocketAddr>) -> anyhow::Result<()> {
    if let Some(addr) = addr {
        metrics::check_loopback(addr).with_context(|| format!("--metrics {addr}"))?;
    }
    Ok(())
}

/// Serves `host`'s metrics on `addr` (and prints where, on stderr) and its stats socket next to
/// `socket`.
pub(crate) fn start(
    host: &Host,
    addr: Option<SocketAddr>,
    socket: Option<&Path>,
) -> anyhow::Result<Watch> {
    let http = match addr {
        Some(addr) => {
            let server = MetricsServer::start(addr, host.metrics())
                .with_context(|| format!("--metrics {addr}"))?;
            eprintln!("metrics: http://{}/metrics", server.local_addr());
            Some(server)
        }
        None => None,
    };
    let stats = match socket {
        Some(socket) => {
            let path = metrics::stats_socket_path(socket);
            Some(
                StatsSocket::bind(&path, host.metrics())
                    .with_context(|| format!("serve the stats socket {}", path.display()))?,
            )
        }
        None => None,
    };
    Ok(Watch {
        _http: http,
        _stats: stats,
    })
}
