//! The proxy-wasm ABI 0.2.1 host functions (module `env`), as Envoy implements them for the
//! Rust SDK 0.2.5: each reads its arguments from the VM's memory, acts on the effective
//! context's stream or on the process-wide [`World`], and answers with a `Status`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use wasmtime::{Caller, Linker, Memory, TypedFunc};

use super::wire;
use super::world::{status, HttpCall, Metric, MetricKind, World};
use super::{LogLevel, LogLine, Reply, Req, State};

/// What a context id names inside one VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ctx {
    Root,
    Stream(Req),
}

/// An http call response being delivered (readable during `on_http_call_response`).
#[derive(Clone, Debug, Default)]
pub struct HttpCallResponse {
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, Vec<u8>)>,
}

/// Work the host does after the current VM callback returns (Envoy's after-VM-call actions).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Deferred {
    /// The filter sent a local reply: the stream completes with it.
    EndWithLocalReply(Req),
    /// The filter closed (reset) the stream.
    Reset(Req),
}

/// Per-VM state: the wasmtime `Store` data of one worker's VM.
pub struct VmData {
    pub worker: usize,
    pub generation: u32,
    pub world: Rc<RefCell<World>>,
    pub memory: Option<Memory>,
    pub alloc: Option<TypedFunc<u32, u32>>,
    /// The context of the callback running now, and the one `set_effective_context` chose.
    pub current: u32,
    pub effective: Option<u32>,
    pub contexts: HashMap<u32, Ctx>,
    pub root_ctx: u32,
    pub next_ctx: u32,
    pub tick_period_ms: u32,
    pub next_tick_ns: Option<u64>,
    pub metric_ids: HashMap<u32, String>,
    pub next_metric: u32,
    pub deferred: Vec<Deferred>,
    pub plugin_config: Vec<u8>,
    pub vm_config: Vec<u8>,
    pub properties: HashMap<String, Vec<u8>>,
    pub http_response: Option<HttpCallResponse>,
    pub rng: u64,
    pub stdout: Vec<u8>,
    pub exit_code: Option<i32>,
}

impl VmData {
    pub fn target(&self) -> u32 {
        self.effective.unwrap_or(self.current)
    }

    pub fn target_stream(&self) -> Option<Req> {
        match self.contexts.get(&self.target()) {
            Some(Ctx::Stream(r)) => Some(*r),
            _ => None,
        }
    }
}

type C<'a> = Caller<'a, VmData>;
type R = wasmtime::Result<u32>;

/// A host error that becomes a trap in the VM.
fn trap(msg: String) -> wasmtime::Error {
    wasmtime::Error::msg(msg)
}

/// Counts the call and fires an injected trap if the test armed one.
fn enter(c: &mut C<'_>, name: &'static str) -> wasmtime::Result<()> {
    let worker = c.data().worker;
    let mut w = c.data().world.borrow_mut();
    *w.hostcall_counts.entry(name).or_default() += 1;
    if w.take_trap(worker, name) {
        drop(w);
        return Err(trap(format!("injected trap in {name} on worker {worker}")));
    }
    Ok(())
}

pub fn read(c: &mut C<'_>, ptr: u32, len: u32) -> Option<Vec<u8>> {
    if len == 0 {
        return Some(Vec::new());
    }
    let mem = c.data().memory?;
    let data = mem.data(&*c);
    data.get(ptr as usize..(ptr as usize).checked_add(len as usize)?)
        .map(<[u8]>::to_vec)
}

fn read_str(c: &mut C<'_>, ptr: u32, len: u32) -> Option<String> {
    read(c, ptr, len).map(|b| String::from_utf8_lossy(&b).into_owned())
}

pub fn write(c: &mut C<'_>, ptr: u32, bytes: &[u8]) -> bool {
    let Some(mem) = c.data().memory else {
        return false;
    };
    mem.write(&mut *c, ptr as usize, bytes).is_ok()
}

fn write_u32(c: &mut C<'_>, ptr: u32, v: u32) -> bool {
    write(c, ptr, &v.to_le_bytes())
}

/// Envoy's `copyToPointerSize`: allocate in the VM (via the SDK's allocator export), copy, and
/// store pointer and size; an empty value is a null pointer.
fn copy_out(c: &mut C<'_>, bytes: &[u8], ptr_ptr: u32, size_ptr: u32) -> R {
    let mut ptr = 0u32;
    if !bytes.is_empty() {
        let Some(alloc) = c.data().alloc.clone() else {
            return Err(trap("module exports no proxy_on_memory_allocate".into()));
        };
        ptr = alloc.call(&mut *c, bytes.len() as u32)?;
        if ptr == 0 || !write(c, ptr, bytes) {
            return Ok(status::INVALID_MEMORY_ACCESS);
        }
    }
    if !write_u32(c, ptr_ptr, ptr) || !write_u32(c, size_ptr, bytes.len() as u32) {
        return Ok(status::INVALID_MEMORY_ACCESS);
    }
    Ok(status::OK)
}

macro_rules! arg {
    ($e:expr) => {
        match $e {
            Some(v) => v,
            None => return Ok(status::INVALID_MEMORY_ACCESS),
        }
    };
}

/// Which header map a `MapType` names for the target context; `None` when the map does not
/// exist there (Envoy: `BadArgument`, or empty in the access-log phase).
enum MapRef {
    RequestHeaders(Req),
    RequestTrailers,
    ResponseHeaders(Req),
    ResponseTrailers,
    HttpCallHeaders,
    HttpCallTrailers,
}

fn map_ref(c: &C<'_>, map_type: u32) -> Option<MapRef> {
    let d = c.data();
    match map_type {
        0 => d.target_stream().map(MapRef::RequestHeaders),
        1 => d.target_stream().map(|_| MapRef::RequestTrailers),
        2 => {
            let r = d.target_stream()?;
            d.world.borrow().stream(r).response_headers.as_ref()?;
            Some(MapRef::ResponseHeaders(r))
        }
        3 => {
            let r = d.target_stream()?;
            d.world.borrow().stream(r).response_headers.as_ref()?;
            Some(MapRef::ResponseTrailers)
        }
        6 => d.http_response.as_ref().map(|_| MapRef::HttpCallHeaders),
        7 => d.http_response.as_ref().map(|_| MapRef::HttpCallTrailers),
        _ => None,
    }
}

fn in_log_phase(c: &C<'_>) -> bool {
    let d = c.data();
    d.target_stream()
        .is_some_and(|r| d.world.borrow().stream(r).log_phase)
}

fn get_map(c: &C<'_>, m: &MapRef) -> Vec<(String, Vec<u8>)> {
    let d = c.data();
    let w = d.world.borrow();
    match m {
        MapRef::RequestHeaders(r) => w.stream(*r).request_headers.clone(),
        MapRef::ResponseHeaders(r) => w.stream(*r).response_headers.clone().unwrap_or_default(),
        MapRef::RequestTrailers | MapRef::ResponseTrailers => Vec::new(),
        MapRef::HttpCallHeaders => d
            .http_response
            .as_ref()
            .map(|h| h.headers.clone())
            .unwrap_or_default(),
        MapRef::HttpCallTrailers => d
            .http_response
            .as_ref()
            .map(|h| h.trailers.clone())
            .unwrap_or_default(),
    }
}

/// Applies `f` to a mutable header map; trailers and call responses are read-only here.
fn edit_map(c: &C<'_>, m: &MapRef, f: impl FnOnce(&mut Vec<(String, Vec<u8>)>)) -> u32 {
    let d = c.data();
    let mut w = d.world.borrow_mut();
    match m {
        MapRef::RequestHeaders(r) => f(&mut w.stream_mut(*r).request_headers),
        MapRef::ResponseHeaders(r) => {
            if let Some(h) = w.stream_mut(*r).response_headers.as_mut() {
                f(h)
            }
        }
        _ => return status::BAD_ARGUMENT,
    }
    status::OK
}

fn lower(k: &str) -> String {
    k.to_ascii_lowercase()
}

pub fn add_to_linker(linker: &mut Linker<VmData>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_log",
        |mut c: C<'_>, level: u32, ptr: u32, len: u32| -> R {
            enter(&mut c, "proxy_log")?;
            let msg = arg!(read_str(&mut c, ptr, len));
            let d = c.data();
            let mut w = d.world.borrow_mut();
            let line = LogLine {
                worker: d.worker,
                level: LogLevel::from_u32(level),
                at_ms: w.now_ms(),
                message: msg,
            };
            if w.echo_logs {
                eprintln!("{line}");
            }
            w.logs.push(line);
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_log_level",
        |mut c: C<'_>, ret: u32| -> R {
            enter(&mut c, "proxy_get_log_level")?;
            let level = c.data().world.borrow().log_level;
            write_u32(&mut c, ret, level);
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut c: C<'_>, ret: u32| -> R {
            enter(&mut c, "proxy_get_current_time_nanoseconds")?;
            let t = {
                let w = c.data().world.borrow();
                w.epoch_ns + w.now_ns
            };
            Ok(if write(&mut c, ret, &t.to_le_bytes()) {
                status::OK
            } else {
                status::INVALID_MEMORY_ACCESS
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut c: C<'_>, period: u32| -> R {
            enter(&mut c, "proxy_set_tick_period_milliseconds")?;
            let now = c.data().world.borrow().now_ns;
            let d = c.data_mut();
            d.tick_period_ms = period;
            d.next_tick_ns = (period > 0).then(|| now + u64::from(period) * 1_000_000);
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut c: C<'_>, kind: u32, start: u32, max: u32, ret_ptr: u32, ret_size: u32| -> R {
            enter(&mut c, "proxy_get_buffer_bytes")?;
            let bytes: Option<Vec<u8>> = {
                let d = c.data();
                match kind {
                    0 | 1 => d.target_stream().map(|r| {
                        let w = d.world.borrow();
                        let s = w.stream(r);
                        if kind == 0 {
                            s.request_body.clone()
                        } else {
                            s.response_body.clone()
                        }
                    }),
                    4 => d.http_response.as_ref().map(|h| h.body.clone()),
                    6 => Some(d.vm_config.clone()),
                    7 => Some(d.plugin_config.clone()),
                    _ => None,
                }
            };
            let Some(bytes) = bytes else {
                return Ok(status::NOT_FOUND);
            };
            let s = (start as usize).min(bytes.len());
            let e = s.saturating_add(max as usize).min(bytes.len());
            copy_out(&mut c, &bytes[s..e], ret_ptr, ret_size)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut c: C<'_>, kind: u32, start: u32, size: u32, ptr: u32, len: u32| -> R {
            enter(&mut c, "proxy_set_buffer_bytes")?;
            let data = arg!(read(&mut c, ptr, len));
            let d = c.data();
            let Some(r) = d.target_stream() else {
                return Ok(status::NOT_FOUND);
            };
            let mut w = d.world.borrow_mut();
            let s = w.stream_mut(r);
            let buf = match kind {
                0 => &mut s.request_body,
                1 => &mut s.response_body,
                _ => return Ok(status::NOT_FOUND),
            };
            let a = (start as usize).min(buf.len());
            let b = a.saturating_add(size as usize).min(buf.len());
            buf.splice(a..b, data);
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut c: C<'_>, map_type: u32, ret_ptr: u32, ret_size: u32| -> R {
            enter(&mut c, "proxy_get_header_map_pairs")?;
            let pairs = match map_ref(&c, map_type) {
                Some(m) => get_map(&c, &m),
                None if in_log_phase(&c) => Vec::new(),
                None => return Ok(status::BAD_ARGUMENT),
            };
            copy_out(&mut c, &wire::serialize_map(&pairs), ret_ptr, ret_size)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut c: C<'_>, map_type: u32, ptr: u32, len: u32| -> R {
            enter(&mut c, "proxy_set_header_map_pairs")?;
            let bytes = arg!(read(&mut c, ptr, len));
            let Some(pairs) = wire::deserialize_map(&bytes) else {
                return Ok(status::SERIALIZATION_FAILURE);
            };
            let Some(m) = map_ref(&c, map_type) else {
                return Ok(status::BAD_ARGUMENT);
            };
            let pairs: Vec<_> = pairs.into_iter().map(|(k, v)| (lower(&k), v)).collect();
            Ok(edit_map(&c, &m, |h| *h = pairs))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut c: C<'_>, map_type: u32, kp: u32, kl: u32, ret_ptr: u32, ret_size: u32| -> R {
            enter(&mut c, "proxy_get_header_map_value")?;
            let key = lower(&arg!(read_str(&mut c, kp, kl)));
            let pairs = match map_ref(&c, map_type) {
                Some(m) => get_map(&c, &m),
                None if in_log_phase(&c) => return Ok(status::NOT_FOUND),
                None => return Ok(status::BAD_ARGUMENT),
            };
            // Envoy joins repeated headers with ','.
            let values: Vec<&[u8]> = pairs
                .iter()
                .filter(|(k, _)| *k == key)
                .map(|(_, v)| v.as_slice())
                .collect();
            if values.is_empty() {
                return Ok(status::NOT_FOUND);
            }
            let joined = values.join(&b","[..]);
            copy_out(&mut c, &joined, ret_ptr, ret_size)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_add_header_map_value",
        |mut c: C<'_>, map_type: u32, kp: u32, kl: u32, vp: u32, vl: u32| -> R {
            enter(&mut c, "proxy_add_header_map_value")?;
            let key = lower(&arg!(read_str(&mut c, kp, kl)));
            let value = arg!(read(&mut c, vp, vl));
            let Some(m) = map_ref(&c, map_type) else {
                return Ok(status::BAD_ARGUMENT);
            };
            Ok(edit_map(&c, &m, |h| h.push((key, value))))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_replace_header_map_value",
        |mut c: C<'_>, map_type: u32, kp: u32, kl: u32, vp: u32, vl: u32| -> R {
            enter(&mut c, "proxy_replace_header_map_value")?;
            let key = lower(&arg!(read_str(&mut c, kp, kl)));
            let value = arg!(read(&mut c, vp, vl));
            let Some(m) = map_ref(&c, map_type) else {
                return Ok(status::BAD_ARGUMENT);
            };
            Ok(edit_map(&c, &m, |h| {
                h.retain(|(k, _)| *k != key);
                h.push((key, value));
            }))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut c: C<'_>, map_type: u32, kp: u32, kl: u32| -> R {
            enter(&mut c, "proxy_remove_header_map_value")?;
            let key = lower(&arg!(read_str(&mut c, kp, kl)));
            let Some(m) = map_ref(&c, map_type) else {
                return Ok(status::BAD_ARGUMENT);
            };
            Ok(edit_map(&c, &m, |h| h.retain(|(k, _)| *k != key)))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_property",
        |mut c: C<'_>, pp: u32, pl: u32, ret_ptr: u32, ret_size: u32| -> R {
            enter(&mut c, "proxy_get_property")?;
            let path = wire::property_path(&arg!(read(&mut c, pp, pl)));
            let value = {
                let d = c.data();
                let from_stream = d
                    .target_stream()
                    .and_then(|r| d.world.borrow().stream(r).properties.get(&path).cloned());
                from_stream.or_else(|| d.properties.get(&path).cloned())
            };
            match value {
                Some(v) => copy_out(&mut c, &v, ret_ptr, ret_size),
                None => Ok(status::NOT_FOUND),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_property",
        |mut c: C<'_>, pp: u32, pl: u32, vp: u32, vl: u32| -> R {
            enter(&mut c, "proxy_set_property")?;
            let path = wire::property_path(&arg!(read(&mut c, pp, pl)));
            let value = arg!(read(&mut c, vp, vl));
            let d = c.data_mut();
            match d.target_stream() {
                Some(r) => {
                    d.world
                        .borrow_mut()
                        .stream_mut(r)
                        .properties
                        .insert(path, value);
                }
                None => {
                    d.properties.insert(path, value);
                }
            }
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut c: C<'_>, kp: u32, kl: u32, ret_ptr: u32, ret_size: u32, ret_cas: u32| -> R {
            enter(&mut c, "proxy_get_shared_data")?;
            let key = arg!(read_str(&mut c, kp, kl));
            let entry = c.data().world.borrow().shared.get(&key).cloned();
            let Some((value, cas)) = entry else {
                return Ok(status::NOT_FOUND);
            };
            let st = copy_out(&mut c, &value, ret_ptr, ret_size)?;
            if st != status::OK {
                return Ok(st);
            }
            Ok(if write_u32(&mut c, ret_cas, cas) {
                status::OK
            } else {
                status::INVALID_MEMORY_ACCESS
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut c: C<'_>, kp: u32, kl: u32, vp: u32, vl: u32, cas: u32| -> R {
            enter(&mut c, "proxy_set_shared_data")?;
            let key = arg!(read_str(&mut c, kp, kl));
            let value = arg!(read(&mut c, vp, vl));
            Ok(c.data().world.borrow_mut().set_shared(&key, value, cas))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_register_shared_queue",
        |mut c: C<'_>, np: u32, nl: u32, ret: u32| -> R {
            enter(&mut c, "proxy_register_shared_queue")?;
            let name = arg!(read_str(&mut c, np, nl));
            let d = c.data();
            let owner = (d.worker, d.generation, d.root_ctx);
            let token = d.world.borrow_mut().register_queue(&name, owner);
            write_u32(&mut c, ret, token);
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_resolve_shared_queue",
        |mut c: C<'_>, vp: u32, vl: u32, np: u32, nl: u32, ret: u32| -> R {
            enter(&mut c, "proxy_resolve_shared_queue")?;
            let vm_id = arg!(read_str(&mut c, vp, vl));
            let name = arg!(read_str(&mut c, np, nl));
            let token = {
                let w = c.data().world.borrow();
                if !vm_id.is_empty() && vm_id != w.vm_id {
                    None
                } else {
                    w.queue_tokens
                        .get(&name)
                        .copied()
                        .filter(|t| w.queues.contains_key(t))
                }
            };
            match token {
                Some(t) => {
                    write_u32(&mut c, ret, t);
                    Ok(status::OK)
                }
                None => Ok(status::NOT_FOUND),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_enqueue_shared_queue",
        |mut c: C<'_>, token: u32, vp: u32, vl: u32| -> R {
            enter(&mut c, "proxy_enqueue_shared_queue")?;
            let value = arg!(read(&mut c, vp, vl));
            Ok(c.data().world.borrow_mut().enqueue(token, value))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_dequeue_shared_queue",
        |mut c: C<'_>, token: u32, ret_ptr: u32, ret_size: u32| -> R {
            enter(&mut c, "proxy_dequeue_shared_queue")?;
            let item = {
                let mut w = c.data().world.borrow_mut();
                match w.queues.get_mut(&token) {
                    None => return Ok(status::NOT_FOUND),
                    Some(q) => q.items.pop_front(),
                }
            };
            match item {
                None => Ok(status::EMPTY),
                Some(v) => copy_out(&mut c, &v, ret_ptr, ret_size),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_continue_stream",
        |mut c: C<'_>, stream_type: u32| -> R {
            enter(&mut c, "proxy_continue_stream")?;
            let d = c.data();
            let Some(r) = d.target_stream() else {
                // Envoy: a root context has no decoder callbacks; the call does nothing.
                d.world.borrow_mut().anomaly(
                    d.worker,
                    "continue_stream on a root context (ignored, like Envoy): was set_effective_context called?",
                );
                return Ok(status::OK);
            };
            let mut w = d.world.borrow_mut();
            if stream_type != 0 {
                // Response continue: nothing is paused on the response path in this host.
                return Ok(status::OK);
            }
            match w.stream(r).state.clone() {
                State::Paused => w.record_resume(r, d.worker),
                State::Pending => w.stream_mut(r).continue_in_headers = true,
                other => {
                    let msg = format!("continue_stream on {r:?} that is not paused ({other:?})");
                    w.anomaly(d.worker, msg);
                }
            }
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_close_stream",
        |mut c: C<'_>, _stream_type: u32| -> R {
            enter(&mut c, "proxy_close_stream")?;
            let d = c.data_mut();
            if let Some(r) = d.target_stream() {
                d.deferred.push(Deferred::Reset(r));
            }
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut c: C<'_>,
         code: u32,
         dp: u32,
         dl: u32,
         bp: u32,
         bl: u32,
         hp: u32,
         hl: u32,
         grpc: i32|
         -> R {
            enter(&mut c, "proxy_send_local_response")?;
            let details = arg!(read_str(&mut c, dp, dl));
            let body = arg!(read(&mut c, bp, bl));
            let headers = arg!(read(&mut c, hp, hl));
            let Some(headers) = wire::deserialize_map(&headers) else {
                return Ok(status::SERIALIZATION_FAILURE);
            };
            let d = c.data_mut();
            let Some(r) = d.target_stream() else {
                d.world.borrow_mut().anomaly(
                    d.worker,
                    "send_local_response on a root context (ignored, like Envoy)",
                );
                return Ok(status::OK);
            };
            let mut w = d.world.borrow_mut();
            if matches!(w.stream(r).state, State::LocalReply(_)) {
                w.anomaly(d.worker, format!("second local reply on {r:?} (ignored)"));
                return Ok(status::OK);
            }
            let at_ms = w.now_ms();
            let reply = Reply {
                status: code,
                headers: headers
                    .into_iter()
                    .map(|(k, v)| (lower(&k), String::from_utf8_lossy(&v).into_owned()))
                    .collect(),
                body: String::from_utf8_lossy(&body).into_owned(),
                details,
                grpc_status: grpc,
                worker: d.worker,
                at_ms,
            };
            w.record_local_reply(r, reply);
            drop(w);
            d.deferred.push(Deferred::EndWithLocalReply(r));
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_http_call",
        |mut c: C<'_>,
         up: u32,
         ul: u32,
         hp: u32,
         hl: u32,
         bp: u32,
         bl: u32,
         _tp: u32,
         _tl: u32,
         timeout: u32,
         ret: u32|
         -> R {
            enter(&mut c, "proxy_http_call")?;
            let upstream = arg!(read_str(&mut c, up, ul));
            let headers = arg!(read(&mut c, hp, hl));
            let body = arg!(read(&mut c, bp, bl));
            let Some(headers) = wire::deserialize_map(&headers) else {
                return Ok(status::SERIALIZATION_FAILURE);
            };
            let token = {
                let d = c.data();
                let mut w = d.world.borrow_mut();
                let token = w.http_calls.len() as u32 + 1;
                w.http_calls.push(HttpCall {
                    token,
                    worker: d.worker,
                    generation: d.generation,
                    ctx: d.target(),
                    upstream,
                    headers,
                    body,
                    timeout_ms: timeout,
                    answered: false,
                });
                token
            };
            write_u32(&mut c, ret, token);
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut c: C<'_>, ctx: u32| -> R {
            enter(&mut c, "proxy_set_effective_context")?;
            let d = c.data_mut();
            if d.contexts.contains_key(&ctx) {
                d.effective = Some(ctx);
                Ok(status::OK)
            } else {
                Ok(status::BAD_ARGUMENT)
            }
        },
    )?;
    linker.func_wrap("env", "proxy_done", |mut c: C<'_>| -> R {
        enter(&mut c, "proxy_done")?;
        Ok(status::OK)
    })?;
    linker.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |mut c: C<'_>, _np: u32, _nl: u32, _ap: u32, _al: u32, _rp: u32, _rs: u32| -> R {
            enter(&mut c, "proxy_call_foreign_function")?;
            Ok(status::NOT_FOUND)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_status",
        |mut c: C<'_>, code: u32, mp: u32, ms: u32| -> R {
            enter(&mut c, "proxy_get_status")?;
            write_u32(&mut c, code, 0);
            write_u32(&mut c, mp, 0);
            write_u32(&mut c, ms, 0);
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: C<'_>, kind: u32, np: u32, nl: u32, ret: u32| -> R {
            enter(&mut c, "proxy_define_metric")?;
            let name = arg!(read_str(&mut c, np, nl));
            let kind = match kind {
                0 => MetricKind::Counter,
                1 => MetricKind::Gauge,
                2 => MetricKind::Histogram,
                _ => return Ok(status::BAD_ARGUMENT),
            };
            let d = c.data_mut();
            {
                let mut w = d.world.borrow_mut();
                let m = w.metrics.entry(name.clone()).or_insert(Metric {
                    kind,
                    value: 0,
                    samples: Vec::new(),
                });
                if m.kind != kind {
                    let msg = format!("metric {name} defined as {kind:?} and as {:?}", m.kind);
                    w.anomaly(d.worker, msg);
                }
            }
            // Like Envoy, every definition gets a new id; the stat behind it is shared by name.
            d.next_metric += 1;
            let id = (d.next_metric << 2) | kind as u32;
            d.metric_ids.insert(id, name);
            write_u32(&mut c, ret, id);
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_increment_metric",
        |mut c: C<'_>, id: u32, offset: i64| -> R {
            enter(&mut c, "proxy_increment_metric")?;
            let d = c.data();
            let Some(name) = d.metric_ids.get(&id) else {
                return Ok(status::NOT_FOUND);
            };
            let mut w = d.world.borrow_mut();
            let now = w.now_ms();
            let Some(m) = w.metrics.get_mut(name) else {
                return Ok(status::NOT_FOUND);
            };
            match m.kind {
                MetricKind::Counter if offset > 0 => m.value += offset as u64,
                MetricKind::Counter => return Ok(status::BAD_ARGUMENT),
                MetricKind::Gauge => {
                    let before = m.value;
                    m.value = m.value.wrapping_add(offset as u64);
                    if offset < 0 && before < offset.unsigned_abs() {
                        let msg = format!("gauge {name} went below zero ({before} {offset:+})");
                        w.anomalies.push(format!("[t={now}ms w{}] {msg}", d.worker));
                    }
                }
                MetricKind::Histogram => return Ok(status::BAD_ARGUMENT),
            }
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_record_metric",
        |mut c: C<'_>, id: u32, value: u64| -> R {
            enter(&mut c, "proxy_record_metric")?;
            let d = c.data();
            let Some(name) = d.metric_ids.get(&id) else {
                return Ok(status::NOT_FOUND);
            };
            let mut w = d.world.borrow_mut();
            let Some(m) = w.metrics.get_mut(name) else {
                return Ok(status::NOT_FOUND);
            };
            match m.kind {
                MetricKind::Counter => m.value += value,
                MetricKind::Gauge => m.value = value,
                MetricKind::Histogram => m.samples.push(value),
            }
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_metric",
        |mut c: C<'_>, id: u32, ret: u32| -> R {
            enter(&mut c, "proxy_get_metric")?;
            let value = {
                let d = c.data();
                let Some(name) = d.metric_ids.get(&id) else {
                    return Ok(status::NOT_FOUND);
                };
                let w = d.world.borrow();
                match w.metrics.get(name) {
                    None => return Ok(status::NOT_FOUND),
                    Some(m) if m.kind == MetricKind::Histogram => return Ok(status::BAD_ARGUMENT),
                    Some(m) => m.value,
                }
            };
            write(&mut c, ret, &value.to_le_bytes());
            Ok(status::OK)
        },
    )?;
    // gRPC is not modelled: the filter does not use it. The SDK maps these to errors.
    linker.func_wrap(
        "env",
        "proxy_grpc_call",
        |mut c: C<'_>,
         _a: u32,
         _b: u32,
         _cc: u32,
         _d: u32,
         _e: u32,
         _f: u32,
         _g: u32,
         _h: u32,
         _i: u32,
         _j: u32,
         _k: u32,
         _l: u32|
         -> R {
            enter(&mut c, "proxy_grpc_call")?;
            Ok(status::INTERNAL_FAILURE)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_stream",
        |mut c: C<'_>,
         _a: u32,
         _b: u32,
         _cc: u32,
         _d: u32,
         _e: u32,
         _f: u32,
         _g: u32,
         _h: u32,
         _i: u32|
         -> R {
            enter(&mut c, "proxy_grpc_stream")?;
            Ok(status::INTERNAL_FAILURE)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_send",
        |mut c: C<'_>, _a: u32, _b: u32, _cc: u32, _d: u32| -> R {
            enter(&mut c, "proxy_grpc_send")?;
            Ok(status::NOT_FOUND)
        },
    )?;
    linker.func_wrap("env", "proxy_grpc_cancel", |mut c: C<'_>, _a: u32| -> R {
        enter(&mut c, "proxy_grpc_cancel")?;
        Ok(status::NOT_FOUND)
    })?;
    linker.func_wrap("env", "proxy_grpc_close", |mut c: C<'_>, _a: u32| -> R {
        enter(&mut c, "proxy_grpc_close")?;
        Ok(status::NOT_FOUND)
    })?;
    Ok(())
}
