// Copies the pinned onnxruntime-web files the page loads into ../static/vendor/ (run by
// `npm ci` as the postinstall step). Only the WebAssembly build: ort.wasm.min.js, its
// loader module and the SIMD .wasm; nothing is fetched from a CDN at run time.
import { copyFileSync, mkdirSync, readFileSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, "node_modules", "onnxruntime-web", "dist");
const vendor = join(here, "..", "static", "vendor");
const FILES = ["ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"];

const { version } = JSON.parse(
  readFileSync(join(here, "node_modules", "onnxruntime-web", "package.json"), "utf8"));
mkdirSync(vendor, { recursive: true });
for (const name of FILES) {
  rmSync(join(vendor, name), { force: true });
  copyFileSync(join(dist, name), join(vendor, name));
}
console.log(`onnxruntime-web ${version}: copied ${FILES.join(", ")} to ${vendor}`);
