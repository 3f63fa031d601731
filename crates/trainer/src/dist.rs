//! Data parallelism on Burn's collectives (`burn-collective`): a thin wrapper that a later move to
//! Burn 0.22's `DistributedContext` replaces.
//!
//! Every rank (one thread per local device, one process per node) keeps its own model and
//! optimizer state for the whole run. After the backward pass of its micro-batches, a rank
//! all-reduces its gradients ([`Peer::all_reduce_grads`]: bucketed, in the fixed parameter path
//! order) and applies the same optimizer step, so the replicas stay equal without any copy of
//! the model. Weights are re-synchronised from rank 0 at each stage's start ([`Peer::sync_model`]).
//!
//! What burn-collective 0.21 lacks for this, worked around here:
//! - `broadcast` is not implemented across nodes: rank 0's tensor is all-reduced with zeros
//!   from every other rank (exact: x + 0 = x).
//! - no operation has a timeout, and a node retries its connection to the orchestrator forever:
//!   every operation runs on the peer's worker thread and is waited for with a deadline
//!   ([`Topology::timeout`]); the orchestrator's address is probed first, with a clear error.
//! - the global ring all-reduce refuses a tensor shorter than the number of nodes: such tensors
//!   are padded with zeros.
//! - leaving (`finish_collective`) races with the closing websocket and can panic in a
//!   background task: ranks do not leave; the process ends after its last operation.
//! - an address without `ws://` is refused by its parser with the fixed-up address as the
//!   "error": addresses are written with the prefix here.

use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor, TensorPrimitive};
use burn_collective::{CollectiveConfig, PeerId, ReduceOperation};

use crate::error::{Error, Result};
use crate::optim::Grads;

/// Set when a rank of this process fails: the others stop waiting at their next operation.
static ABORT: AtomicBool = AtomicBool::new(false);

/// What the ranks that stop because another failed say ([`follows_another`]).
const OTHER_FAILED: &str = "another rank of this process failed";
const RANKS_FAILED: &str = "rank(s) failed";

/// Whether `e` is a rank's stop because another rank failed, rather than a cause.
pub fn follows_another(e: &Error) -> bool {
    let e = e.to_string();
    e.contains(OTHER_FAILED) || e.contains(RANKS_FAILED)
}

/// Gradient bucket size (f32 elements, 25 MB as PyTorch DDP's default): few collective calls
/// for many small parameters, and bounded extra memory for the concatenated copy.
const BUCKET: usize = 25 << 20 >> 2;

/// Where this process sits in a (possibly multi-node) run.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    /// Processes in the run (burn-collective's nodes), each with the same number of devices.
    pub nodes: usize,
    /// This process's index among them.
    pub node_rank: usize,
    /// `host:port` of the orchestrator, which node 0 starts in-process (unless `external`).
    pub master: Option<String>,
    /// The orchestrator runs elsewhere: node 0 does not start one.
    pub external: bool,
    /// How long a rank waits at a collective operation (for a slow, dead or unreachable peer)
    /// before it stops with an error.
    pub timeout: Duration,
}

impl Topology {
    /// One process.
    pub fn single() -> Self {
        Self {
            nodes: 1,
            node_rank: 0,
            master: None,
            external: false,
            timeout: Duration::from_secs(900),
        }
    }

    fn master_addr(&self) -> Result<(String, u16)> {
        let m = self.master.as_deref().ok_or_else(|| {
            Error::Config(format!(
                "{} processes but no orchestrator address: set MASTER_ADDR and MASTER_PORT, \
                 or --master HOST:PORT",
                self.nodes
            ))
        })?;
        let (host, port) = m
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
            .ok_or_else(|| Error::Config(format!("master address `{m}`: expected HOST:PORT")))?;
        Ok((host, port))
    }

    /// The port node `r` serves its tensors on: the orchestrator's port + 1 + r.
    fn data_port(&self, master_port: u16, r: usize) -> Result<u16> {
        u16::try_from(master_port as usize + 1 + r)
            .map_err(|_| Error::Config(format!("master port {master_port} + {r} is past 65535")))
    }
}

/// One rank's handle on the collective. Ranks are numbered node by node:
/// `rank = node_rank × local devices + local index`.
pub struct Peer<B: Backend> {
    pub rank: usize,
    pub world: usize,
    id: PeerId,
    device: B::Device,
    timeout: Duration,
    worker: Sender<Box<dyn FnOnce() + Send>>,
}

/// Per-process setup of the global level: the orchestrator (node 0), after checking the ports.
/// Call once per process, before [`Peer::join`].
pub fn start_node(topo: &Topology) -> Result<()> {
    if topo.nodes <= 1 {
        return Ok(());
    }
    // Warnings and errors of the collective's network layer on stderr; its INFO lines (every
    // connection, every tensor download) would flood the training's output.
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing_subscriber::filter::LevelFilter::WARN)
        .with_writer(std::io::stderr)
        .try_init();
    let (host, port) = topo.master_addr()?;
    let data = topo.data_port(port, topo.node_rank)?;
    // A port taken by another run would fail inside a background task, unseen.
    free_port(data, "this process's tensor service")?;
    if topo.node_rank == 0 && !topo.external {
        free_port(port, "the orchestrator")?;
        std::thread::Builder::new()
            .name("pali-orchestrator".into())
            .spawn(move || {
                let _ = serve_orchestrator(port);
            })
            .map_err(|e| Error::Train(format!("starting the orchestrator: {e}")))?;
    }
    wait_reachable(&host, port, topo.timeout)
}

/// Runs burn-collective's orchestrator on `port` until the process ends.
pub fn serve_orchestrator(port: u16) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| Error::Train(format!("starting the orchestrator's runtime: {e}")))?;
    rt.block_on(burn_collective::start_global_orchestrator(port));
    Ok(())
}

fn free_port(port: u16, what: &str) -> Result<()> {
    TcpListener::bind(("0.0.0.0", port)).map(drop).map_err(|e| {
        Error::Train(format!(
            "port {port} ({what}) is taken ({e}): another run on this host? \
             choose another MASTER_PORT"
        ))
    })
}

/// Waits until `host:port` accepts connections (the orchestrator may start after us).
fn wait_reachable(host: &str, port: u16, timeout: Duration) -> Result<()> {
    let until = Instant::now() + timeout.min(Duration::from_secs(120));
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| Error::Train(format!("master address {host}:{port}: {e}")))?
        .collect();
    loop {
        if addrs
            .iter()
            .any(|a| TcpStream::connect_timeout(a, Duration::from_secs(2)).is_ok())
        {
            return Ok(());
        }
        if Instant::now() > until {
            return Err(Error::Train(format!(
                "the orchestrator at {host}:{port} is unreachable (is rank 0 running, and \
                 MASTER_ADDR this host's address for it?)"
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// This host's address as the orchestrator's host sees it: the local end of a route to it.
fn own_host(master_host: &str, port: u16) -> String {
    let local = (master_host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .and_then(|a| {
            let s = std::net::UdpSocket::bind(("0.0.0.0", 0)).ok()?;
            s.connect(a).ok()?;
            s.local_addr().ok()
        });
    match local {
        Some(a) => a.ip().to_string(),
        None => "127.0.0.1".into(),
    }
}

impl<B: Backend> Peer<B> {
    /// Registers local device `local` (of `local_devices`) of this process with the collective;
    /// returns when every rank of the run has registered.
    pub fn join(
        topo: &Topology,
        local: usize,
        local_devices: usize,
        device: B::Device,
    ) -> Result<Self> {
        let rank = topo.node_rank * local_devices + local;
        let world = topo.nodes * local_devices;
        let mut cfg = CollectiveConfig::default().with_num_devices(local_devices);
        if topo.nodes > 1 {
            let (host, port) = topo.master_addr()?;
            let data = topo.data_port(port, topo.node_rank)?;
            let me = own_host(&host, port);
            let addr = |s: String| s.parse().expect("an address is any string");
            cfg = cfg
                .with_num_nodes(topo.nodes as u32)
                .with_global_address(addr(format!("ws://{host}:{port}")))
                .with_node_address(addr(format!("ws://{me}:{data}")))
                .with_data_service_port(data);
        }
        let (tx, rx) = channel::<Box<dyn FnOnce() + Send>>();
        std::thread::Builder::new()
            .name(format!("pali-collective-{rank}"))
            .spawn(move || {
                while let Ok(op) = rx.recv() {
                    op()
                }
            })
            .map_err(|e| Error::Train(format!("starting rank {rank}'s worker: {e}")))?;
        let peer = Self {
            rank,
            world,
            id: PeerId(rank as u32),
            device,
            timeout: topo.timeout,
            worker: tx,
        };
        let (id, dev) = (peer.id, peer.device.clone());
        peer.call("register", move || {
            burn_collective::register::<B>(id, dev, cfg)
        })?;
        // Every process must have as many devices as this one, or ranks would collide.
        let ones = Tensor::<B, 1>::ones([1], &peer.device);
        let seen = peer.sum(ones)?.into_scalar().elem::<f64>() as usize;
        if seen != world {
            return Err(Error::Config(format!(
                "{seen} ranks joined, but this process counts {world} ({} processes × {local_devices}                  devices): every process must list the same number of devices",
                topo.nodes
            )));
        }
        Ok(peer)
    }

    /// Runs `op` on the worker thread and waits for it, at most the timeout.
    fn call<T: Send + 'static>(
        &self,
        what: &str,
        op: impl FnOnce() -> std::result::Result<T, burn_collective::CollectiveError> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = channel();
        self.worker
            .send(Box::new(move || {
                let _ = tx.send(op());
            }))
            .map_err(|_| self.lost(what, "its worker stopped"))?;
        let until = Instant::now() + self.timeout;
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => return Err(self.lost(what, &format!("{e:?}"))),
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.lost(what, "the collective stopped"))
                }
                Err(RecvTimeoutError::Timeout) => {
                    if ABORT.load(Ordering::Relaxed) {
                        return Err(self.lost(what, OTHER_FAILED));
                    }
                    if Instant::now() > until {
                        let why = format!(
                            "no answer in {} s: a rank died, hangs or cannot connect",
                            self.timeout.as_secs()
                        );
                        return Err(self.lost(what, &why));
                    }
                }
            }
        }
    }

    fn lost(&self, what: &str, why: &str) -> Error {
        Error::Train(format!(
            "rank {} of {}: {what} failed: {why}",
            self.rank, self.world
        ))
    }

    /// Marks this process's ranks as failed: the others stop at their next operation.
    pub fn abort() {
        ABORT.store(true, Ordering::Relaxed);
    }

    /// Before a run: forgets the ranks and the failure of an earlier run in this process (an
    /// ablation grid trains many runs in one process).
    pub fn reset() {
        ABORT.store(false, Ordering::Relaxed);
        burn_collective::reset_collective::<B>();
    }

    /// The sum over ranks of `t`.
    pub fn sum(&self, t: Tensor<B, 1>) -> Result<Tensor<B, 1>> {
        let id = self.id;
        // The global ring cuts a tensor into one slice per node and refuses a shorter one
        // (`RingReduceImpossible`): pad with zeros.
        let n = t.dims()[0];
        let t = if n < self.world {
            Tensor::cat(vec![t, Tensor::zeros([self.world - n], &self.device)], 0)
        } else {
            t
        };
        let p = t.into_primitive().tensor();
        let out = self.call("all-reduce", move || {
            burn_collective::all_reduce::<B>(id, p, ReduceOperation::Sum)
        })?;
        Ok(Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(out)).slice(0..n))
    }

    /// Waits for every rank; `ok` false on some rank makes the call fail on every rank.
    pub fn barrier(&self, what: &str, ok: bool) -> Result<()> {
        let flag = Tensor::<B, 1>::from_floats([if ok { 0.0 } else { 1.0 }], &self.device);
        let failed = self.sum(flag)?.into_scalar().elem::<f64>();
        if failed > 0.0 {
            return Err(Error::Train(format!(
                "{what}: {failed} {RANKS_FAILED} (see their error)"
            )));
        }
        Ok(())
    }

    /// Rank 0's tensor on every rank.
    pub fn from_root(&self, t: Tensor<B, 1>) -> Result<Tensor<B, 1>> {
        let t = if self.rank == 0 { t } else { t.zeros_like() };
        self.sum(t)
    }

    /// The sum over ranks of every gradient, in buckets of about 25 MB in `grads`' order (the
    /// parameter path order, the same on every rank).
    pub fn all_reduce_grads(&self, grads: Grads<B>) -> Result<Grads<B>> {
        let mut out = Vec::with_capacity(grads.len());
        let mut bucket: Vec<(String, Tensor<B, 1>)> = Vec::new();
        let mut size = 0;
        let flush = |bucket: &mut Vec<(String, Tensor<B, 1>)>, out: &mut Grads<B>| {
            if bucket.is_empty() {
                return Ok(());
            }
            let lens: Vec<usize> = bucket.iter().map(|(_, t)| t.dims()[0]).collect();
            let (paths, ts): (Vec<String>, Vec<_>) = std::mem::take(bucket).into_iter().unzip();
            let summed = self.sum(Tensor::cat(ts, 0))?;
            let mut at = 0;
            for (p, n) in paths.into_iter().zip(lens) {
                out.push((p, summed.clone().slice(at..at + n)));
                at += n;
            }
            Ok::<_, Error>(())
        };
        for (p, g) in grads {
            size += g.dims()[0];
            bucket.push((p, g));
            if size >= BUCKET {
                flush(&mut bucket, &mut out)?;
                size = 0;
            }
        }
        flush(&mut bucket, &mut out)?;
        Ok(out)
    }

    /// Rank 0's weights in every rank's `model` (in the module's fixed parameter order).
    pub fn sync_model<AD, M>(&self, model: M) -> Result<M>
    where
        AD: AutodiffBackend<InnerBackend = B>,
        M: Module<AD>,
    {
        struct Sync<'a, B: Backend> {
            peer: &'a Peer<B>,
            err: Option<Error>,
        }
        impl<AD: AutodiffBackend> ModuleMapper<AD> for Sync<'_, AD::InnerBackend> {
            fn map_float<const D: usize>(
                &mut self,
                p: Param<Tensor<AD, D>>,
            ) -> Param<Tensor<AD, D>> {
                if self.err.is_some() {
                    return p;
                }
                let v = p.val().inner();
                let dims = v.dims();
                let n: usize = dims.iter().product();
                match self.peer.from_root(v.reshape([n])) {
                    Ok(t) => {
                        let id = p.id;
                        p.transform_for_load(Tensor::from_inner(t.reshape(dims)), id)
                    }
                    Err(e) => {
                        self.err = Some(e);
                        p
                    }
                }
            }
        }
        let mut s = Sync {
            peer: self,
            err: None,
        };
        let model = model.map(&mut s);
        match s.err {
            Some(e) => Err(e),
            None => Ok(model),
        }
    }
}
