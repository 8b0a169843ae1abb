// flowae-serve's page: pick or drop photos, see the top-5 flower names as bars and the
// autoencoder's reconstruction beside the model's input. "on the server" posts each photo to
// /v1/classify and /v1/reconstruct; "on this device" runs the same ONNX graphs here with
// onnxruntime-web (WebAssembly, one thread, files from /static/vendor/, never a CDN) after the
// preprocessing in preprocess.js. Everything model-specific (classes, preprocessing, tensor
// names, graph URLs) comes from GET /v1/model.
import { decodeImage, denormalizeToRgba, preprocessRgb, topK } from "./preprocess.js";

const TOP_K = 5;
const $ = (selector) => document.querySelector(selector);
const state = { model: null, sessions: null, busy: Promise.resolve() };

function setStatus(text, kind = "ready") {
  const status = $("#status");
  status.textContent = text;
  status.dataset.state = kind;
}

function mode() {
  return document.querySelector("input[name=mode]:checked").value;
}

// The precision the browser runs: ?precision= in the page URL, else the server's own.
function devicePrecision() {
  const asked = new URLSearchParams(location.search).get("precision");
  const graphs = state.model.graphs;
  if (asked && graphs[asked]) return asked;
  return graphs[state.model.precision] ? state.model.precision : "fp32";
}

async function deviceSessions() {
  if (state.sessions) return state.sessions;
  const ort = window.ort;
  ort.env.wasm.wasmPaths = new URL("/static/vendor/", location.href).href;
  ort.env.wasm.numThreads = 1; // no COOP/COEP headers, so no SharedArrayBuffer threads
  ort.env.wasm.proxy = false;
  const precision = devicePrecision();
  const graphs = state.model.graphs[precision];
  const decoderUrl = graphs.decoder || (state.model.graphs.fp32 || {}).decoder;
  const load = async (url) => {
    const response = await fetch(url);
    if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
    return ort.InferenceSession.create(new Uint8Array(await response.arrayBuffer()),
      { executionProviders: ["wasm"], graphOptimizationLevel: "all" });
  };
  const [encoder, decoder] = await Promise.all([
    load(graphs.encoder_classifier), decoderUrl ? load(decoderUrl) : null]);
  state.sessions = { encoder, decoder, precision };
  return state.sessions;
}

async function classifyOnDevice(file) {
  const { encoder, decoder, precision } = await deviceSessions();
  const spec = state.model.preprocess;
  const io = state.model.io;
  const S = spec.image_size_px;
  const { rgb, width, height } = await decodeImage(file);
  const pillowMajor = parseInt(state.model.versions.pillow, 10);
  const { crop, input } = preprocessRgb(rgb, width, height, spec, pillowMajor);
  const ort = window.ort;
  const feeds = { [io.encoder_classifier.inputs[0]]: new ort.Tensor("float32", input, [1, 3, S, S]) };
  const [logitsName, latentName] = io.encoder_classifier.outputs;
  const out = await encoder.run(feeds);
  const result = { image: file.name, top_k: topK(out[logitsName].data, TOP_K, state.model.class_names) };
  let recon = null;
  if (decoder) {
    const decoded = await decoder.run({ [io.decoder.inputs[0]]: out[latentName] });
    recon = denormalizeToRgba(decoded[io.decoder.outputs[0]].data, S, spec);
  }
  const cropRgba = new Uint8ClampedArray(S * S * 4);
  for (let i = 0; i < S * S; i++) {
    cropRgba.set([crop[i * 3], crop[i * 3 + 1], crop[i * 3 + 2], 255], i * 4);
  }
  return { result, crop: new ImageData(cropRgba, S, S), recon: recon && new ImageData(recon, S, S),
           where: `this device (onnxruntime-web ${window.ort.env.versions?.web ?? ""} wasm, ${precision})` };
}

async function postImage(path, file) {
  const form = new FormData();
  form.append("file", file, file.name);
  const response = await fetch(path, { method: "POST", body: form });
  if (!response.ok) {
    const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
    throw new Error(body.error || `HTTP ${response.status}`);
  }
  return response;
}

async function classifyOnServer(file) {
  const [classified, reconstructed] = await Promise.all([
    postImage(`/v1/classify?top_k=${TOP_K}`, file), postImage("/v1/reconstruct", file)]);
  const result = await classified.json();
  const pair = await createImageBitmap(await reconstructed.blob()); // (S, 2S): input | recon
  const S = pair.height;
  const half = (x) => {
    const canvas = new OffscreenCanvas(S, S);
    const ctx = canvas.getContext("2d");
    ctx.drawImage(pair, x, 0, S, S, 0, 0, S, S);
    return ctx.getImageData(0, 0, S, S);
  };
  return { result, crop: half(0), recon: half(S),
           where: `the server (${result.provider ?? state.model.provider}, ${state.model.precision})` };
}

function draw(canvas, imageData) {
  if (!imageData) return;
  canvas.width = imageData.width;
  canvas.height = imageData.height;
  canvas.getContext("2d").putImageData(imageData, 0, 0);
}

function showResult(card, answer, ms) {
  const { result } = answer;
  card.querySelector(".title").textContent =
    `${result.top_k[0].class_name} · ${result.image} · on ${answer.where} · ${ms.toFixed(0)} ms`;
  draw(card.querySelector(".crop"), answer.crop);
  draw(card.querySelector(".recon"), answer.recon);
  const bars = card.querySelector(".bars");
  for (const entry of result.top_k) {
    const li = document.createElement("li");
    const pct = (100 * entry.probability).toFixed(1);
    li.innerHTML = '<span class="name"></span><span class="track"><span class="bar"></span></span><span class="p"></span>';
    li.querySelector(".name").textContent = entry.class_name;
    li.querySelector(".bar").style.width = `${Math.max(entry.probability * 100, 0.5)}%`;
    li.querySelector(".bar").style.display = "block";
    li.querySelector(".p").textContent = `${pct} %`;
    bars.append(li);
  }
  card.dataset.top1 = result.top_k[0].class_name;
  card.dataset.result = JSON.stringify(result);
}

async function handle(file) {
  const card = $("#card").content.firstElementChild.cloneNode(true);
  const where = mode();
  card.dataset.mode = where;
  card.dataset.file = file.name;
  card.querySelector(".title").textContent = `${file.name} …`;
  const photo = card.querySelector(".photo");
  photo.src = URL.createObjectURL(file);
  $("#results").prepend(card);
  const start = performance.now();
  try {
    const answer = where === "device" ? await classifyOnDevice(file) : await classifyOnServer(file);
    showResult(card, answer, performance.now() - start);
  } catch (error) {
    const p = card.querySelector(".error");
    p.hidden = false;
    p.textContent = String(error.message || error);
    card.dataset.error = p.textContent;
    card.querySelector(".title").textContent = file.name;
  }
  card.dataset.done = "true";
}

function enqueue(files) {
  for (const file of files) {
    state.busy = state.busy.then(async () => {
      setStatus(`Working on ${file.name}…`, "busy");
      await handle(file);
      setStatus("Ready: pick or drop more photos.");
    });
  }
}

async function start() {
  try {
    const response = await fetch("/v1/model");
    state.model = await response.json();
  } catch (error) {
    setStatus(`Cannot read /v1/model: ${error}`, "error");
    return;
  }
  const m = state.model;
  $("#model-line").textContent = `${m.variant} · ${m.class_names.length} flowers · ` +
    `${m.precision} on ${m.provider} · flowae ${m.versions.flowae}`;
  // In-browser mode needs the vendor files (`npm ci` in runtime/serve/web) and graph files
  // the manifest lists (a model directory from flowae-export).
  const noDevice = !window.ort ? "onnxruntime-web is not installed on this server"
    : Object.keys(m.graphs).length === 0 ? "this model has no manifest-listed graph files" : "";
  if (noDevice) {
    const device = document.querySelector("input[name=mode][value=device]");
    device.disabled = true;
    device.parentElement.title = noDevice;
  }
  const input = $("#files");
  input.addEventListener("change", () => { enqueue([...input.files]); input.value = ""; });
  const drop = $("#drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    enqueue([...e.dataTransfer.files].filter((f) => f.type.startsWith("image/")));
  });
  setStatus("Ready: pick or drop flower photos.");
}

start();
