//! An emulated Envoy for `filter.wasm`: a proxy-wasm ABI 0.2.1 host on wasmtime that runs the
//! real module deterministically, so every interleaving the real proxy can produce — and a few
//! it produces only rarely — can be forced and asserted exactly.
//!
//! One [`Host`] is one Envoy process: `workers` VMs (one wasmtime instance each, like Envoy's
//! per-worker VMs) of one compiled [`Filter`], sharing shared data, shared queues and metrics.
//! Time is virtual: it moves only in [`Host::advance`], which fires each VM's ticks in time
//! order. Queue notifications are posted events, delivered at once after the callback that
//! caused them ([`Delivery::Immediate`], what Envoy does in practice) or when the test says so
//! ([`Delivery::Manual`], to force races such as a grant that arrives after the client left).
//!
//! ```ignore
//! let mut h = Host::new(Filter::built(), 4, CONFIG);
//! let r0 = h.request(0, "a.example.com").send();
//! let r1 = h.request(2, "a.example.com").send();
//! assert_eq!(h.state(r1), State::Paused);
//! h.advance(40);
//! h.finish(r0, 200);
//! assert!(matches!(h.state(r1), State::Resumed { worker: 2, .. }));
//! ```
//!
//! Host functions: all of the proxy-wasm ABI 0.2.1 imports of the Rust SDK 0.2.5 (logs,
//! log level, time, ticks, buffers, header maps, properties, shared data, shared queues,
//! continue/close stream, local replies, http calls, effective context, metrics, foreign
//! functions → NotFound, gRPC → failure) and the WASI preview1 calls a Rust cdylib makes
//! (clocks on the virtual clock, deterministic `random_get`, environ/args, `fd_write` into the
//! log capture, `proc_exit`, fd stubs). Anything else the module imports traps with its name.
//!
//! Envoy behaviour this host knowingly does not model:
//! - true parallelism: one callback runs at a time, so CAS races happen only when injected
//!   ([`Host::inject_cas_mismatch`]); nothing interleaves inside a callback;
//! - Envoy's own timers: stream idle / request / upstream timeouts and http-call timeouts never
//!   fire; a stream ends only when the test finishes or resets it (or the filter replies);
//! - flow control and buffer limits (no 413 for large buffered bodies), trailers, HTTP/2
//!   specifics, gRPC calls and streams;
//! - tick drift: ticks fire exactly every period from `on_configure`, so all VMs tick in phase;
//! - after a VM crash, notifications for its still-registered queues are dropped; real Envoy
//!   may hand them to a reloaded VM on the same thread (same `vm_key`) — not verified;
//! - shared data and queues live in one `vm_id` namespace; config reloads (old and new VMs side
//!   by side), VM shutdown (`on_done` of the root context, `proxy_done`) and `FAIL_OPEN`;
//! - properties other than those the test sets (plus `plugin_name`, `plugin_root_id`,
//!   `plugin_vm_id`); metric tag extraction (histograms keep raw samples; a gauge that would
//!   wrap below zero is reported as an anomaly);
//! - memory limits and CPU time limits of the VM.

// A test harness: a test that misuses the API (finishing a request that never reached the
// upstream, a worker that does not exist) has a bug, and the clearest report is a panic naming it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod abi;
pub mod artifact;
mod wasi;
pub mod wire;
pub mod world;

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;

use wasmtime::{Engine, InstancePre, Linker, Module, Store, TypedFunc, WasmParams, WasmResults};

use abi::{Ctx, Deferred, HttpCallResponse, VmData};
pub use world::{Event, Headers, HttpCall, Metric, MetricKind, Stream, TrapRecord};
use world::{TrapFault, World};

/// A request started by the test; an index into the host's streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Req(pub usize);

/// What the filter decided for a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// `on_request_headers` is running (never seen by a test between calls).
    Pending,
    /// `on_request_headers` returned Continue: the request went upstream at once.
    Admitted,
    /// `on_request_headers` returned Pause and nothing resumed it yet.
    Paused,
    /// A paused request that the filter continued (`continue_stream`), on `worker` at `at_ms`.
    Resumed { worker: usize, at_ms: u64 },
    /// The filter (or the host for a failed VM) answered the request itself.
    LocalReply(Reply),
}

/// A local reply as the client receives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u32,
    /// Header names lower-cased, in the order the filter gave them.
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub details: String,
    pub grpc_status: i32,
    pub worker: usize,
    pub at_ms: u64,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// How a stream ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// The upstream answered with this status (the test's `finish`).
    Finished { status: u32, at_ms: u64 },
    /// The downstream went away (`reset`), or the filter closed the stream.
    Reset { at_ms: u64, by_filter: bool },
    /// The stream completed with the filter's local reply.
    LocalReply { at_ms: u64 },
}

/// A paused request continued by the filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resume {
    pub req: Req,
    pub worker: usize,
    pub at_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
    Critical,
    /// Written to WASI stdout / stderr (e.g. a panic message without a hook).
    Stdout,
    Stderr,
}

impl LogLevel {
    fn from_u32(v: u32) -> Self {
        match v {
            0 => LogLevel::Trace,
            1 => LogLevel::Debug,
            2 => LogLevel::Info,
            3 => LogLevel::Warn,
            4 => LogLevel::Error,
            _ => LogLevel::Critical,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    pub worker: usize,
    pub level: LogLevel,
    pub at_ms: u64,
    pub message: String,
}

impl fmt::Display for LogLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[t={}ms w{} {:?}] {}",
            self.at_ms, self.worker, self.level, self.message
        )
    }
}

/// When queue notifications reach the VM that registered the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// After the callback that enqueued returns, before the test's call returns.
    Immediate,
    /// Only in [`Host::run`] / [`Host::deliver_next`].
    Manual,
}

/// What Envoy does with a new request on a worker whose VM failed (`failure_policy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailurePolicy {
    /// `FAIL_RELOAD`: a new VM (next generation) is started for the next request.
    Reload,
    /// `FAIL_CLOSED`: the host answers 503 `wasm_fail_stream`.
    Closed,
}

/// A response the test's upstream sends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Response {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn status(status: u32) -> Self {
        Response {
            status,
            ..Response::default()
        }
    }
}

/// The compiled module, shared by every host and VM (compile once, instantiate per VM).
#[derive(Clone)]
pub struct Filter {
    engine: Engine,
    module: Module,
    pre: InstancePre<VmData>,
    /// Counts wasm instructions (wasmtime fuel): see [`Filter::metered`] and [`Host::fuel_used`].
    metered: bool,
}

/// The fuel each VM of a metered filter starts with (far more than any test uses).
const FUEL: u64 = u64::MAX / 4;

impl Filter {
    fn engine() -> wasmtime::Result<Engine> {
        let mut config = wasmtime::Config::new();
        // Compile time matters more than speed here (a debug-built Cranelift is slow).
        config.cranelift_opt_level(wasmtime::OptLevel::None);
        Engine::new(&config)
    }

    pub fn from_bytes(wasm: &[u8]) -> wasmtime::Result<Filter> {
        let engine = Filter::engine()?;
        let module = Module::new(&engine, wasm)?;
        Filter::link(engine, module)
    }

    /// The module with instruction counting: wasmtime's fuel, one unit per wasm instruction
    /// (roughly), the same on every run and machine — a steady measure of the filter's own
    /// work, where wall time is not. Slower than [`Filter::from_bytes`].
    pub fn metered(wasm: &[u8]) -> wasmtime::Result<Filter> {
        let mut config = wasmtime::Config::new();
        config.cranelift_opt_level(wasmtime::OptLevel::None);
        config.consume_fuel(true);
        let engine = Engine::new(&config)?;
        let module = Module::new(&engine, wasm)?;
        let mut f = Filter::link(engine, module)?;
        f.metered = true;
        Ok(f)
    }

    /// Like [`Filter::from_bytes`], keeping the compiled code in `cache` (next to the wasm) so
    /// each test binary does not compile the module again. The cache is keyed by the module's
    /// bytes and the engine's compatibility hash; anything else recompiles.
    pub fn from_bytes_cached(wasm: &[u8], cache: &std::path::Path) -> wasmtime::Result<Filter> {
        use std::hash::{Hash, Hasher};
        let engine = Filter::engine()?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        wasm.hash(&mut hasher);
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let key = hasher.finish().to_le_bytes();
        if let Ok(bytes) = std::fs::read(cache) {
            if bytes.len() > 8 && bytes[..8] == key {
                // SAFETY: the file was written below by this same engine configuration from
                // `Module::serialize` (checked by the key); wasmtime validates the header too.
                if let Ok(module) = unsafe { Module::deserialize(&engine, &bytes[8..]) } {
                    return Filter::link(engine, module);
                }
            }
        }
        let module = Module::new(&engine, wasm)?;
        if let Ok(compiled) = module.serialize() {
            let tmp = cache.with_extension(format!("tmp{}", std::process::id()));
            let mut out = key.to_vec();
            out.extend_from_slice(&compiled);
            if std::fs::write(&tmp, out).is_ok() {
                let _ = std::fs::rename(&tmp, cache);
            }
        }
        Filter::link(engine, module)
    }

    fn link(engine: Engine, module: Module) -> wasmtime::Result<Filter> {
        let mut linker: Linker<VmData> = Linker::new(&engine);
        abi::add_to_linker(&mut linker)?;
        wasi::add_to_linker(&mut linker)?;
        // Anything else the module imports traps with its name when called.
        linker.define_unknown_imports_as_traps(&module)?;
        let pre = linker.instantiate_pre(&module)?;
        Ok(Filter {
            engine,
            module,
            pre,
            metered: false,
        })
    }

    /// The release `filter.wasm`, built once per test process (see [`artifact`]).
    pub fn built() -> &'static Filter {
        artifact::filter()
    }

    /// `(module, name)` of every import, for checking what the module needs.
    pub fn imports(&self) -> Vec<(String, String)> {
        self.module
            .imports()
            .map(|i| (i.module().to_string(), i.name().to_string()))
            .collect()
    }

    pub fn exports(&self) -> Vec<String> {
        self.module
            .exports()
            .map(|e| e.name().to_string())
            .collect()
    }
}

pub use artifact::filter_wasm_path;

/// `proxy_on_http_call_response(context, token, headers, body size, trailers)`.
type HttpCallResponseFn = TypedFunc<(u32, u32, u32, u32, u32), ()>;

struct Exports {
    on_context_create: Option<TypedFunc<(u32, u32), ()>>,
    on_vm_start: Option<TypedFunc<(u32, u32), u32>>,
    on_configure: Option<TypedFunc<(u32, u32), u32>>,
    on_tick: Option<TypedFunc<u32, ()>>,
    on_queue_ready: Option<TypedFunc<(u32, u32), ()>>,
    on_request_headers: Option<TypedFunc<(u32, u32, u32), u32>>,
    on_request_body: Option<TypedFunc<(u32, u32, u32), u32>>,
    on_response_headers: Option<TypedFunc<(u32, u32, u32), u32>>,
    on_response_body: Option<TypedFunc<(u32, u32, u32), u32>>,
    on_log: Option<TypedFunc<u32, ()>>,
    on_done: Option<TypedFunc<u32, u32>>,
    on_delete: Option<TypedFunc<u32, ()>>,
    on_http_call_response: Option<HttpCallResponseFn>,
}

struct Vm {
    store: Store<VmData>,
    ex: Exports,
    alive: bool,
}

/// How to build a [`Host`].
#[derive(Clone)]
pub struct HostBuilder {
    filter: Filter,
    workers: usize,
    plugin_config: Vec<u8>,
    vm_config: Vec<u8>,
    root_id: String,
    vm_id: String,
    log_level: LogLevel,
    delivery: Delivery,
    policy: FailurePolicy,
    properties: Vec<(String, Vec<u8>)>,
    epoch_ms: u64,
    seed: u64,
    echo_logs: bool,
}

impl HostBuilder {
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }
    pub fn plugin_config(mut self, json: impl Into<Vec<u8>>) -> Self {
        self.plugin_config = json.into();
        self
    }
    pub fn vm_config(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.vm_config = bytes.into();
        self
    }
    pub fn root_id(mut self, id: &str) -> Self {
        self.root_id = id.to_string();
        self
    }
    pub fn vm_id(mut self, id: &str) -> Self {
        self.vm_id = id.to_string();
        self
    }
    /// What `proxy_get_log_level` answers (Envoy's default is info).
    pub fn log_level(mut self, level: LogLevel) -> Self {
        self.log_level = level;
        self
    }
    pub fn delivery(mut self, d: Delivery) -> Self {
        self.delivery = d;
        self
    }
    pub fn failure_policy(mut self, p: FailurePolicy) -> Self {
        self.policy = p;
        self
    }
    /// A property every context can read (streams may override it per request).
    pub fn property(mut self, path: &str, value: impl Into<Vec<u8>>) -> Self {
        self.properties.push((path.to_string(), value.into()));
        self
    }
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// Print the VMs' log lines and host anomalies to stderr as they happen.
    pub fn echo_logs(mut self, on: bool) -> Self {
        self.echo_logs = on;
        self
    }

    /// Starts every VM: instantiate, `_initialize`, root context, `on_vm_start`, `on_configure`.
    /// Fails, with the VM's log, if a VM traps or rejects its configuration.
    pub fn build(self) -> Result<Host, String> {
        let mut world = World::new();
        world.epoch_ns = self.epoch_ms * 1_000_000;
        world.vm_id = self.vm_id.clone();
        world.log_level = self.log_level as u32;
        world.echo_logs = self.echo_logs || std::env::var_os("EMU_ECHO_LOGS").is_some();
        let mut host = Host {
            world: Rc::new(RefCell::new(world)),
            vms: Vec::new(),
            generations: vec![0; self.workers],
            cfg: self,
        };
        for w in 0..host.cfg.workers {
            host.start_vm(w)?;
        }
        Ok(host)
    }
}

/// One emulated Envoy process. See the module docs.
pub struct Host {
    cfg: HostBuilder,
    world: Rc<RefCell<World>>,
    vms: Vec<Vm>,
    generations: Vec<u32>,
}

const ROOT_CTX: u32 = 1;

impl Host {
    pub fn builder(filter: &Filter) -> HostBuilder {
        HostBuilder {
            filter: filter.clone(),
            workers: 1,
            plugin_config: Vec::new(),
            vm_config: Vec::new(),
            root_id: "inflight".to_string(),
            vm_id: String::new(),
            log_level: LogLevel::Info,
            delivery: Delivery::Immediate,
            policy: FailurePolicy::Reload,
            properties: Vec::new(),
            epoch_ms: 1_700_000_000_000,
            seed: 0x1f1e_57ed,
            echo_logs: false,
        }
    }

    /// `workers` VMs configured with `plugin_config`; panics with the VM log if that fails.
    pub fn new(filter: &Filter, workers: usize, plugin_config: &str) -> Host {
        Host::builder(filter)
            .workers(workers)
            .plugin_config(plugin_config)
            .build()
            .unwrap_or_else(|e| panic!("host did not start: {e}"))
    }

    // ---- VMs -------------------------------------------------------------------------------

    fn start_vm(&mut self, w: usize) -> Result<(), String> {
        let generation = self.generations[w];
        let mut properties: HashMap<String, Vec<u8>> =
            self.cfg.properties.iter().cloned().collect();
        properties
            .entry("plugin_root_id".into())
            .or_insert_with(|| self.cfg.root_id.clone().into_bytes());
        properties
            .entry("plugin_vm_id".into())
            .or_insert_with(|| self.cfg.vm_id.clone().into_bytes());
        properties
            .entry("plugin_name".into())
            .or_insert_with(|| self.cfg.root_id.clone().into_bytes());
        let data = VmData {
            worker: w,
            generation,
            world: self.world.clone(),
            memory: None,
            alloc: None,
            current: 0,
            effective: None,
            contexts: HashMap::from([(ROOT_CTX, Ctx::Root)]),
            root_ctx: ROOT_CTX,
            next_ctx: ROOT_CTX + 1,
            tick_period_ms: 0,
            next_tick_ns: None,
            metric_ids: HashMap::new(),
            next_metric: 0,
            deferred: Vec::new(),
            plugin_config: self.cfg.plugin_config.clone(),
            vm_config: self.cfg.vm_config.clone(),
            properties,
            http_response: None,
            rng: self.cfg.seed ^ ((w as u64 + 1) << 32) ^ u64::from(generation),
            stdout: Vec::new(),
            exit_code: None,
        };
        let f = &self.cfg.filter;
        let mut store = Store::new(&f.engine, data);
        if f.metered {
            store
                .set_fuel(FUEL)
                .map_err(|e| format!("worker {w}: setting fuel: {e:#}"))?;
        }
        let instance = f
            .pre
            .instantiate(&mut store)
            .map_err(|e| format!("instantiate worker {w}: {e:#}"))?;
        if instance
            .get_func(&mut store, "proxy_abi_version_0_2_1")
            .is_none()
        {
            return Err("module does not export proxy_abi_version_0_2_1".into());
        }
        let memory = instance.get_memory(&mut store, "memory");
        let alloc = instance
            .get_typed_func::<u32, u32>(&mut store, "proxy_on_memory_allocate")
            .or_else(|_| instance.get_typed_func::<u32, u32>(&mut store, "malloc"))
            .ok();
        store.data_mut().memory = memory;
        store.data_mut().alloc = alloc;
        macro_rules! ex {
            ($name:literal) => {
                instance.get_typed_func(&mut store, $name).ok()
            };
        }
        let ex = Exports {
            on_context_create: ex!("proxy_on_context_create"),
            on_vm_start: ex!("proxy_on_vm_start"),
            on_configure: ex!("proxy_on_configure"),
            on_tick: ex!("proxy_on_tick"),
            on_queue_ready: ex!("proxy_on_queue_ready"),
            on_request_headers: ex!("proxy_on_request_headers"),
            on_request_body: ex!("proxy_on_request_body"),
            on_response_headers: ex!("proxy_on_response_headers"),
            on_response_body: ex!("proxy_on_response_body"),
            on_log: ex!("proxy_on_log"),
            on_done: ex!("proxy_on_done"),
            on_delete: ex!("proxy_on_delete"),
            on_http_call_response: ex!("proxy_on_http_call_response"),
        };
        let init = instance
            .get_typed_func::<(), ()>(&mut store, "_initialize")
            .or_else(|_| instance.get_typed_func::<(), ()>(&mut store, "_start"))
            .ok();
        let vm = Vm {
            store,
            ex,
            alive: true,
        };
        if w < self.vms.len() {
            self.vms[w] = vm;
        } else {
            self.vms.push(vm);
        }
        if let Some(init) = init {
            let vm = &mut self.vms[w];
            if let Err(e) = init.call(&mut vm.store, ()) {
                self.crash(w, &e);
            }
        }
        self.call(w, 0, |e| e.on_context_create.clone(), (ROOT_CTX, 0));
        let vm_len = self.cfg.vm_config.len() as u32;
        let ok = self.call(w, ROOT_CTX, |e| e.on_vm_start.clone(), (ROOT_CTX, vm_len));
        if ok != Some(1) {
            return Err(format!(
                "worker {w}: on_vm_start failed ({ok:?})\n{}",
                self.log_text(w)
            ));
        }
        let len = self.cfg.plugin_config.len() as u32;
        let ok = self.call(w, ROOT_CTX, |e| e.on_configure.clone(), (ROOT_CTX, len));
        if ok != Some(1) {
            return Err(format!(
                "worker {w}: on_configure rejected the plugin configuration ({ok:?})\n{}",
                self.log_text(w)
            ));
        }
        self.settle();
        Ok(())
    }

    /// Calls an export on worker `w` with `ctx` as the current context. `None` if the VM is
    /// dead, lacks the export, or traps (then it is dead).
    fn call<P: WasmParams, Rt: WasmResults>(
        &mut self,
        w: usize,
        ctx: u32,
        pick: impl Fn(&Exports) -> Option<TypedFunc<P, Rt>>,
        args: P,
    ) -> Option<Rt> {
        let vm = &mut self.vms[w];
        if !vm.alive {
            return None;
        }
        let func = pick(&vm.ex)?;
        let d = vm.store.data_mut();
        let saved = (d.current, d.effective);
        d.current = ctx;
        d.effective = None;
        let res = func.call(&mut vm.store, args);
        let d = vm.store.data_mut();
        (d.current, d.effective) = saved;
        match res {
            Ok(r) => Some(r),
            Err(e) => {
                self.crash(w, &e);
                None
            }
        }
    }

    fn crash(&mut self, w: usize, e: &wasmtime::Error) {
        let vm = &mut self.vms[w];
        vm.alive = false;
        vm.store.data_mut().deferred.clear();
        let generation = vm.store.data().generation;
        let mut world = self.world.borrow_mut();
        let at_ms = world.now_ms();
        let message = format!("{e:?}");
        if world.echo_logs {
            eprintln!("emu: worker {w} VM trapped: {message}");
        }
        world.traps.push(TrapRecord {
            worker: w,
            generation,
            at_ms,
            message,
        });
    }

    /// Like an Envoy VM crash: the VM is gone, nothing more is called on it or its streams,
    /// its queues stay registered but their notifications are dropped.
    pub fn kill(&mut self, w: usize) {
        let e = wasmtime::Error::msg("killed by the test");
        self.crash(w, &e);
    }

    /// Starts a new VM (next generation) on worker `w`, like `FAIL_RELOAD` does.
    pub fn restart(&mut self, w: usize) -> Result<(), String> {
        self.generations[w] += 1;
        self.start_vm(w)
    }

    pub fn is_alive(&self, w: usize) -> bool {
        self.vms[w].alive
    }

    pub fn generation(&self, w: usize) -> u32 {
        self.generations[w]
    }

    pub fn workers(&self) -> usize {
        self.vms.len()
    }

    fn live(&self, w: usize, generation: u32) -> bool {
        self.vms[w].alive && self.generations[w] == generation
    }

    // ---- the event loop ----------------------------------------------------------------------

    /// Runs after-call work (local replies, resets) and, in immediate mode, queue notifications,
    /// until nothing is left.
    fn settle(&mut self) {
        loop {
            if let Some((w, d)) = self.take_deferred() {
                self.apply_deferred(w, d);
                continue;
            }
            if self.cfg.delivery == Delivery::Immediate && self.deliver_next() {
                continue;
            }
            break;
        }
    }

    fn take_deferred(&mut self) -> Option<(usize, Deferred)> {
        for (w, vm) in self.vms.iter_mut().enumerate() {
            let d = &mut vm.store.data_mut().deferred;
            if !d.is_empty() {
                return Some((w, d.remove(0)));
            }
        }
        None
    }

    fn apply_deferred(&mut self, _w: usize, d: Deferred) {
        let now = self.now_ms();
        match d {
            Deferred::EndWithLocalReply(r) => {
                let reply = match self.state(r) {
                    State::LocalReply(reply) => reply,
                    _ => return,
                };
                let mut headers: Headers =
                    vec![(":status".into(), reply.status.to_string().into())];
                headers.extend(
                    reply
                        .headers
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone().into_bytes())),
                );
                let resp = (headers, reply.body.into_bytes());
                self.end_stream(r, Some(resp), End::LocalReply { at_ms: now });
            }
            Deferred::Reset(r) => self.end_stream(
                r,
                None,
                End::Reset {
                    at_ms: now,
                    by_filter: true,
                },
            ),
        }
    }

    /// Delivers the oldest pending queue notification; false if there was none.
    pub fn deliver_next(&mut self) -> bool {
        let Some(ev) = self.world.borrow_mut().events.pop_front() else {
            return false;
        };
        let Event::QueueReady {
            worker,
            generation,
            root_ctx,
            token,
        } = ev.clone();
        if self.live(worker, generation) {
            self.call(
                worker,
                root_ctx,
                |e| e.on_queue_ready.clone(),
                (root_ctx, token),
            );
        } else {
            self.world.borrow_mut().dropped_events.push(ev);
        }
        true
    }

    /// Delivers every pending notification (and what they cause) — the workers' event loops.
    pub fn run(&mut self) {
        loop {
            self.settle();
            if !self.deliver_next() {
                break;
            }
        }
        self.settle();
    }

    pub fn pending_events(&self) -> Vec<Event> {
        self.world.borrow().events.iter().cloned().collect()
    }

    pub fn set_delivery(&mut self, d: Delivery) {
        self.cfg.delivery = d;
        self.settle();
    }

    /// Advances the virtual clock by `ms`, firing every tick that falls due, in time order
    /// (ties: lower worker first), each at its own time.
    pub fn advance(&mut self, ms: u64) {
        let target = self.world.borrow().now_ns + ms * 1_000_000;
        loop {
            let due = self
                .vms
                .iter()
                .enumerate()
                .filter(|(_, vm)| vm.alive)
                .filter_map(|(w, vm)| vm.store.data().next_tick_ns.map(|t| (t, w)))
                .filter(|(t, _)| *t <= target)
                .min();
            let Some((t, w)) = due else { break };
            {
                let mut world = self.world.borrow_mut();
                world.now_ns = world.now_ns.max(t);
            }
            let d = self.vms[w].store.data_mut();
            d.next_tick_ns = Some(t + u64::from(d.tick_period_ms) * 1_000_000);
            self.call(w, ROOT_CTX, |e| e.on_tick.clone(), ROOT_CTX);
            self.settle();
        }
        self.world.borrow_mut().now_ns = target;
        self.settle();
    }

    pub fn now_ms(&self) -> u64 {
        self.world.borrow().now_ms()
    }

    /// When worker `w`'s next tick fires (ms), if it has a tick period.
    pub fn next_tick_ms(&self, w: usize) -> Option<u64> {
        self.vms[w].store.data().next_tick_ns.map(|t| t / 1_000_000)
    }

    // ---- streams -----------------------------------------------------------------------------

    /// Starts describing a request to `authority` arriving on worker `worker`.
    pub fn request(&mut self, worker: usize, authority: &str) -> RequestBuilder<'_> {
        assert!(worker < self.vms.len(), "no worker {worker}");
        RequestBuilder {
            host: self,
            worker,
            headers: vec![
                (":authority".into(), authority.as_bytes().to_vec()),
                (":path".into(), b"/".to_vec()),
                (":method".into(), b"GET".to_vec()),
                (":scheme".into(), b"http".to_vec()),
            ],
            properties: HashMap::new(),
            body: None,
        }
    }

    fn start_request(
        &mut self,
        w: usize,
        headers: Headers,
        properties: HashMap<String, Vec<u8>>,
        body: Option<Vec<u8>>,
    ) -> Req {
        if !self.vms[w].alive && self.cfg.policy == FailurePolicy::Reload {
            if let Err(e) = self.restart(w) {
                self.world
                    .borrow_mut()
                    .anomaly(w, format!("reload failed: {e}"));
            }
        }
        let generation = self.generations[w];
        let now = self.now_ms();
        let r = Req(self.world.borrow().streams.len());
        let ctx = {
            let d = self.vms[w].store.data_mut();
            let ctx = d.next_ctx;
            d.next_ctx += 1;
            d.contexts.insert(ctx, Ctx::Stream(r));
            ctx
        };
        let n_headers = headers.len() as u32;
        self.world.borrow_mut().streams.push(Stream {
            worker: w,
            generation,
            ctx,
            started_ms: now,
            request_headers: headers,
            request_body: Vec::new(),
            response_headers: None,
            response_body: Vec::new(),
            properties,
            state: State::Pending,
            ended: None,
            upstream_headers: None,
            continue_in_headers: false,
            log_phase: false,
        });
        if !self.vms[w].alive {
            self.fail_stream(r);
            return r;
        }
        self.call(w, ctx, |e| e.on_context_create.clone(), (ctx, ROOT_CTX));
        let eos = u32::from(body.is_none());
        let action = self.call(
            w,
            ctx,
            |e| e.on_request_headers.clone(),
            (ctx, n_headers, eos),
        );
        let Some(action) = action else {
            self.fail_stream(r);
            self.settle();
            return r;
        };
        {
            let mut world = self.world.borrow_mut();
            let s = world.stream_mut(r);
            if s.state == State::Pending {
                if action == 0 {
                    s.state = State::Admitted;
                    s.upstream_headers = Some(s.request_headers.clone());
                } else if s.continue_in_headers {
                    world.record_resume(r, w);
                } else {
                    s.state = State::Paused;
                }
            }
        }
        self.settle();
        if let Some(body) = body {
            let live = {
                let world = self.world.borrow();
                world.stream(r).ended.is_none()
            } && self.live(w, generation);
            if live {
                let len = body.len() as u32;
                self.world.borrow_mut().stream_mut(r).request_body = body;
                let action = self.call(w, ctx, |e| e.on_request_body.clone(), (ctx, len, 1));
                if action == Some(0) && self.state(r) == State::Paused {
                    // Envoy: FilterDataStatus::Continue after headers stopped sends the headers
                    // on (filter.h). The request leaves without the filter resuming it.
                    let mut world = self.world.borrow_mut();
                    world.anomaly(
                        w,
                        format!("{r:?} paused at headers was released by on_request_body returning Continue"),
                    );
                    world.record_resume(r, w);
                }
                self.settle();
            }
        }
        r
    }

    /// Envoy's fail-closed answer for a stream whose VM failed.
    fn fail_stream(&mut self, r: Req) {
        let now = self.now_ms();
        let mut world = self.world.borrow_mut();
        let s = world.stream_mut(r);
        if s.ended.is_some() || matches!(s.state, State::LocalReply(_)) {
            return;
        }
        s.state = State::LocalReply(Reply {
            status: 503,
            headers: Vec::new(),
            body: String::new(),
            details: "wasm_fail_stream".into(),
            grpc_status: -1,
            worker: s.worker,
            at_ms: now,
        });
        s.ended = Some(End::LocalReply { at_ms: now });
    }

    /// Ends a stream: response headers/body (if any), then `on_log`, `on_done`, `on_delete`,
    /// then the context is gone (`set_effective_context` on it → BadArgument).
    fn end_stream(&mut self, r: Req, response: Option<(Headers, Vec<u8>)>, end: End) {
        let (w, generation, ctx) = {
            let mut world = self.world.borrow_mut();
            let s = world.stream_mut(r);
            if s.ended.is_some() {
                return;
            }
            s.ended = Some(end);
            (s.worker, s.generation, s.ctx)
        };
        if let Some((headers, body)) = response {
            let n = headers.len() as u32;
            let eos = u32::from(body.is_empty());
            {
                let mut world = self.world.borrow_mut();
                let s = world.stream_mut(r);
                s.response_headers = Some(headers);
                s.response_body = body.clone();
            }
            if self.live(w, generation) {
                self.call(w, ctx, |e| e.on_response_headers.clone(), (ctx, n, eos));
                if !body.is_empty() {
                    let len = body.len() as u32;
                    self.call(w, ctx, |e| e.on_response_body.clone(), (ctx, len, 1));
                }
            }
        }
        if self.live(w, generation) {
            self.world.borrow_mut().stream_mut(r).log_phase = true;
            self.call(w, ctx, |e| e.on_log.clone(), ctx);
            self.world.borrow_mut().stream_mut(r).log_phase = false;
            self.call(w, ctx, |e| e.on_done.clone(), ctx);
            self.call(w, ctx, |e| e.on_delete.clone(), ctx);
        }
        if self.generations[w] == generation {
            self.vms[w].store.data_mut().contexts.remove(&ctx);
        }
    }

    /// The upstream answers `r` with `status` (no body): response headers, log, done.
    pub fn finish(&mut self, r: Req, status: u32) {
        self.finish_with(r, Response::status(status));
    }

    pub fn finish_with(&mut self, r: Req, resp: Response) {
        let s = self.stream(r);
        assert!(
            s.is_upstream(),
            "finish({r:?}): the request is not upstream (state {:?}, ended {:?})",
            s.state,
            s.ended
        );
        let mut headers: Headers = vec![(":status".into(), resp.status.to_string().into())];
        headers.extend(resp.headers.into_iter().map(|(k, v)| (k, v.into_bytes())));
        let at_ms = self.now_ms();
        self.end_stream(
            r,
            Some((headers, resp.body)),
            End::Finished {
                status: resp.status,
                at_ms,
            },
        );
        self.settle();
    }

    /// The downstream goes away (client disconnect / reset) at any point: log, done.
    pub fn reset(&mut self, r: Req) {
        let s = self.stream(r);
        assert!(
            s.ended.is_none(),
            "reset({r:?}): already ended {:?}",
            s.ended
        );
        let at_ms = self.now_ms();
        self.end_stream(
            r,
            None,
            End::Reset {
                at_ms,
                by_filter: false,
            },
        );
        self.settle();
    }

    // ---- http calls --------------------------------------------------------------------------

    pub fn http_calls(&self) -> Vec<HttpCall> {
        self.world.borrow().http_calls.clone()
    }

    /// Delivers the response of the filter's `dispatch_http_call` with `token`.
    pub fn respond_http_call(&mut self, token: u32, resp: Response) {
        let call = {
            let mut world = self.world.borrow_mut();
            let call = world
                .http_calls
                .iter_mut()
                .find(|c| c.token == token)
                .unwrap_or_else(|| panic!("no http call {token}"));
            assert!(!call.answered, "http call {token} already answered");
            call.answered = true;
            call.clone()
        };
        if !self.live(call.worker, call.generation) {
            return;
        }
        let mut headers: Headers = vec![(":status".into(), resp.status.to_string().into())];
        headers.extend(resp.headers.into_iter().map(|(k, v)| (k, v.into_bytes())));
        let (n, len) = (headers.len() as u32, resp.body.len() as u32);
        self.vms[call.worker].store.data_mut().http_response = Some(HttpCallResponse {
            headers,
            body: resp.body,
            trailers: Vec::new(),
        });
        self.call(
            call.worker,
            call.ctx,
            |e| e.on_http_call_response.clone(),
            (call.ctx, token, n, len, 0),
        );
        self.vms[call.worker].store.data_mut().http_response = None;
        self.settle();
    }

    // ---- reading back ------------------------------------------------------------------------

    pub fn stream(&self, r: Req) -> Stream {
        self.world.borrow().stream(r).clone()
    }

    pub fn state(&self, r: Req) -> State {
        self.world.borrow().stream(r).state.clone()
    }

    pub fn ended(&self, r: Req) -> Option<End> {
        self.world.borrow().stream(r).ended.clone()
    }

    /// The local reply of `r`; panics naming the actual state if there is none.
    pub fn reply(&self, r: Req) -> Reply {
        match self.state(r) {
            State::LocalReply(reply) => reply,
            other => panic!("{r:?} has no local reply: {other:?}"),
        }
    }

    pub fn requests(&self) -> Vec<Req> {
        (0..self.world.borrow().streams.len()).map(Req).collect()
    }

    /// Requests past the filter and not finished: what the upstream sees now.
    pub fn upstream(&self) -> Vec<Req> {
        let world = self.world.borrow();
        (0..world.streams.len())
            .map(Req)
            .filter(|r| world.stream(*r).is_upstream())
            .collect()
    }

    /// Requests paused and not ended.
    pub fn paused(&self) -> Vec<Req> {
        let world = self.world.borrow();
        (0..world.streams.len())
            .map(Req)
            .filter(|r| {
                let s = world.stream(*r);
                s.ended.is_none() && s.state == State::Paused
            })
            .collect()
    }

    pub fn resumes(&self) -> Vec<Resume> {
        self.world.borrow().resumes.clone()
    }

    pub fn resume_order(&self) -> Vec<Req> {
        self.world.borrow().resumes.iter().map(|r| r.req).collect()
    }

    /// A metric by the name the filter defined (a `wasmcustom.` prefix is accepted too).
    pub fn metric(&self, name: &str) -> Option<Metric> {
        let name = name.strip_prefix("wasmcustom.").unwrap_or(name);
        self.world.borrow().metrics.get(name).cloned()
    }

    fn metric_or_panic(&self, name: &str, kind: MetricKind) -> Metric {
        let m = self.metric(name).unwrap_or_else(|| {
            panic!(
                "no metric {name}; defined: {:?}",
                self.world.borrow().metrics.keys().collect::<Vec<_>>()
            )
        });
        assert_eq!(m.kind, kind, "metric {name}");
        m
    }

    pub fn counter(&self, name: &str) -> u64 {
        self.metric_or_panic(name, MetricKind::Counter).value
    }

    /// A gauge's value; a gauge decremented below zero shows as negative (Envoy would wrap).
    pub fn gauge(&self, name: &str) -> i64 {
        self.metric_or_panic(name, MetricKind::Gauge).value as i64
    }

    pub fn histogram(&self, name: &str) -> Vec<u64> {
        self.metric_or_panic(name, MetricKind::Histogram).samples
    }

    pub fn metric_names(&self) -> Vec<String> {
        self.world.borrow().metrics.keys().cloned().collect()
    }

    pub fn log_lines(&self) -> Vec<LogLine> {
        self.world.borrow().logs.clone()
    }

    /// The messages logged by worker `w`'s VMs.
    pub fn logs(&self, w: usize) -> Vec<String> {
        self.world
            .borrow()
            .logs
            .iter()
            .filter(|l| l.worker == w)
            .map(|l| l.message.clone())
            .collect()
    }

    fn log_text(&self, w: usize) -> String {
        self.world
            .borrow()
            .logs
            .iter()
            .filter(|l| l.worker == w)
            .map(|l| format!("  {l}\n"))
            .collect()
    }

    /// Things the filter did that Envoy tolerates but that are almost certainly bugs
    /// (a resume without effective context, a gauge below zero, a body releasing a paused
    /// request, ...).
    pub fn anomalies(&self) -> Vec<String> {
        self.world.borrow().anomalies.clone()
    }

    pub fn traps(&self) -> Vec<TrapRecord> {
        self.world.borrow().traps.clone()
    }

    pub fn dropped_events(&self) -> Vec<Event> {
        self.world.borrow().dropped_events.clone()
    }

    /// How many times the filter made host call `name` (e.g. `proxy_set_shared_data`).
    /// Wasm instructions (fuel) the VMs used so far; 0 unless the filter is metered.
    pub fn fuel_used(&self) -> u64 {
        if !self.cfg.filter.metered {
            return 0;
        }
        self.vms
            .iter()
            .map(|vm| FUEL.saturating_sub(vm.store.get_fuel().unwrap_or(FUEL)))
            .sum()
    }

    /// Host calls so far, by name.
    pub fn hostcall_counts(&self) -> Vec<(&'static str, u64)> {
        let mut v: Vec<(&'static str, u64)> = self
            .world
            .borrow()
            .hostcall_counts
            .iter()
            .map(|(k, n)| (*k, *n))
            .collect();
        v.sort_unstable();
        v
    }

    pub fn hostcall_count(&self, name: &str) -> u64 {
        self.world
            .borrow()
            .hostcall_counts
            .iter()
            .find(|(k, _)| **k == name)
            .map_or(0, |(_, v)| *v)
    }

    pub fn shared_data(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.world.borrow().shared.get(key).cloned()
    }

    pub fn shared_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.world.borrow().shared.keys().cloned().collect();
        keys.sort();
        keys
    }

    /// Registered queue names and which worker (VM generation) each notifies.
    pub fn queues(&self) -> Vec<(String, usize, u32)> {
        let world = self.world.borrow();
        let mut q: Vec<_> = world
            .queues
            .values()
            .map(|q| (q.name.clone(), q.owner.0, q.owner.1))
            .collect();
        q.sort();
        q
    }

    // ---- fault injection ---------------------------------------------------------------------

    /// The next `n` `proxy_set_shared_data` calls that carry a CAS fail with `CasMismatch`
    /// (as if another worker had written first); unconditional sets are unaffected.
    pub fn inject_cas_mismatch(&mut self, n: u32) {
        self.world.borrow_mut().faults.cas_mismatch_next = n;
    }

    pub fn cas_mismatches_left(&self) -> u32 {
        self.world.borrow().faults.cas_mismatch_next
    }

    /// Host call `hostcall` traps on worker `worker` (any worker if `None`) after letting
    /// `skip` calls through. The trap kills that VM like a crash in Envoy.
    pub fn inject_trap(&mut self, worker: Option<usize>, hostcall: &str, skip: u32) {
        self.world.borrow_mut().faults.traps.push(TrapFault {
            worker,
            hostcall: hostcall.to_string(),
            skip,
        });
    }

    /// Unregisters a queue: resolve and enqueue on it return NotFound from now on.
    pub fn drop_queue(&mut self, name: &str) -> bool {
        let mut world = self.world.borrow_mut();
        let Some(token) = world.queue_tokens.remove(name) else {
            return false;
        };
        world.queues.remove(&token);
        true
    }

    /// Writes shared data from outside the VMs (as another plugin or a test setup would).
    pub fn set_shared_data(&mut self, key: &str, value: &[u8]) {
        self.world.borrow_mut().set_shared(key, value.to_vec(), 0);
    }
}

/// A request being described; [`RequestBuilder::send`] runs it through the filter.
pub struct RequestBuilder<'h> {
    host: &'h mut Host,
    worker: usize,
    headers: Headers,
    properties: HashMap<String, Vec<u8>>,
    body: Option<Vec<u8>>,
}

impl RequestBuilder<'_> {
    /// Adds a header (name lower-cased, like Envoy), replacing a default pseudo-header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        let name = name.to_ascii_lowercase();
        if name.starts_with(':') {
            self.headers.retain(|(k, _)| *k != name);
        }
        self.headers.push((name, value.as_bytes().to_vec()));
        self
    }

    /// A property this stream reads, e.g. `xds.cluster_name`.
    pub fn property(mut self, path: &str, value: &str) -> Self {
        self.properties
            .insert(path.to_string(), value.as_bytes().to_vec());
        self
    }

    /// A property this stream reads, as raw bytes (Envoy serializes integers as 8
    /// little-endian bytes, e.g. `destination.port`).
    pub fn property_bytes(mut self, path: &str, value: &[u8]) -> Self {
        self.properties.insert(path.to_string(), value.to_vec());
        self
    }

    /// A request body: `on_request_headers` sees end_of_stream=false, then `on_request_body`
    /// is called with the whole body right after, also while the headers are paused.
    pub fn body(mut self, body: &[u8]) -> Self {
        self.body = Some(body.to_vec());
        self
    }

    pub fn send(self) -> Req {
        self.host
            .start_request(self.worker, self.headers, self.properties, self.body)
    }
}
