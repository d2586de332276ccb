// Runs a wasm32-wasip1 test binary under Node's built-in WASI (preview1): the cargo runner
// for `scripts/test-core-wasm.sh`. Usage: node scripts/wasi-runner.mjs <file.wasm> [args...]
import { readFile } from "node:fs/promises";
import { WASI } from "node:wasi";
import process from "node:process";

const [wasmPath, ...args] = process.argv.slice(2);
const wasi = new WASI({
  version: "preview1",
  args: [wasmPath, ...args],
  env: process.env,
  // proptest keeps failure files relative to the working directory.
  preopens: { ".": process.cwd() },
  returnOnExit: true,
});
const module = await WebAssembly.compile(await readFile(wasmPath));
const instance = await WebAssembly.instantiate(module, wasi.getImportObject());
process.exitCode = wasi.start(instance);
