// The model's preprocessing in the browser, bit for bit what runtime/preprocess.py does with
// Pillow: RGBA pixels -> RGB (alpha over white, as runtime/images.py), resize so the shorter
// side is resize_px with Pillow's antialiased bilinear (ImagingResample: separable, horizontal
// pass then vertical, coefficients normalised to 22-bit fixed point, uint8 between passes),
// centre crop (zero padding, Python's round-half-even offsets), then /255 and (x - mean) / std
// in float32, NCHW. The rule's numbers come from GET /v1/model (the contract's metadata), never
// from this file. Pure functions except decodeImage (browser only), so Node can test them.

const PRECISION_BITS = 32 - 8 - 2; // Pillow's fixed point for 8-bit images
const ONE = 2 ** PRECISION_BITS;
const HALF = 2 ** (PRECISION_BITS - 1);

function triangle(x) {
  x = Math.abs(x);
  return x < 1.0 ? 1.0 - x : 0.0;
}

// Pillow's precompute_coeffs + normalize_coeffs_8bpc for a box [0, inSize) -> outSize.
export function resampleCoeffs(inSize, outSize) {
  const scale = inSize / outSize;
  const filterscale = scale < 1.0 ? 1.0 : scale;
  const support = 1.0 * filterscale; // bilinear's support is 1, widened when downscaling
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const weights = new Float64Array(outSize * ksize);
  const pre = new Float64Array(ksize);
  const ss = 1.0 / filterscale;
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    let xmin = Math.trunc(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    let xmax = Math.trunc(center + support + 0.5);
    if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    let ww = 0.0;
    for (let x = 0; x < xmax; x++) {
      const w = triangle((x + xmin - center + 0.5) * ss);
      pre[x] = w;
      ww += w;
    }
    for (let x = 0; x < xmax; x++) {
      const k = ww !== 0.0 ? pre[x] / ww : pre[x];
      weights[xx * ksize + x] = k < 0 ? Math.trunc(-0.5 + k * ONE) : Math.trunc(0.5 + k * ONE);
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { ksize, bounds, weights };
}

function clip8(ss) {
  const v = Math.floor(ss / ONE);
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

// One of Pillow's 8-bit passes over uint8 RGB (h, w, 3): along x (horizontal: -> (h, outSize,
// 3)) or along y (-> (outSize, w, 3)); taps summed in order from a half, then >> 22, clipped.
function resamplePass(src, w, h, outSize, horizontal) {
  const { ksize, bounds, weights } = resampleCoeffs(horizontal ? w : h, outSize);
  const outW = horizontal ? outSize : w, outH = horizontal ? h : outSize;
  const tapStride = horizontal ? 3 : w * 3; // from one source tap to the next
  const out = new Uint8Array(outW * outH * 3);
  for (let y = 0; y < outH; y++) {
    for (let x = 0; x < outW; x++) {
      const i = horizontal ? x : y; // the output's index along the resized axis
      const line = horizontal ? y * w * 3 : x * 3; // where its source line starts
      const first = line + bounds[i * 2] * tapStride, taps = bounds[i * 2 + 1], k0 = i * ksize;
      let s0 = HALF, s1 = HALF, s2 = HALF;
      for (let t = 0; t < taps; t++) {
        const k = weights[k0 + t], p = first + t * tapStride;
        s0 += src[p] * k;
        s1 += src[p + 1] * k;
        s2 += src[p + 2] * k;
      }
      const o = (y * outW + x) * 3;
      out[o] = clip8(s0);
      out[o + 1] = clip8(s1);
      out[o + 2] = clip8(s2);
    }
  }
  return out;
}

// Pillow's Image.resize(size, BILINEAR) on an RGB image: each pass only where a side changes.
// Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many
// pixels as the width (ImagingResampleInner); older Pillow always went horizontal first.
// The order changes the uint8 rounding between the passes, so it must match the server's.
export function resizeBilinear(rgb, w, h, outW, outH, pillowMajor = 13) {
  const verticalFirst = pillowMajor >= 13 && h - outH > 0 && h - outH > (w - outW) * 2;
  if (verticalFirst) {
    const tall = outH !== h ? resamplePass(rgb, w, h, outH, false) : rgb;
    return outW !== w ? resamplePass(tall, w, outH, outW, true) : tall;
  }
  const wide = outW !== w ? resamplePass(rgb, w, h, outW, true) : rgb;
  return outH !== h ? resamplePass(wide, outW, h, outH, false) : wide;
}

// (width, height) with the shorter side resizePx; the longer side int(resizePx * long / short).
export function resizedSize(w, h, resizePx) {
  const short = Math.min(w, h), long = Math.max(w, h);
  const newLong = Math.trunc((resizePx * long) / short);
  return w <= h ? [resizePx, newLong] : [newLong, resizePx];
}

function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

// RGBA (h, w, 4) -> RGB (h, w, 3); alpha composited over white as Pillow's alpha_composite.
export function rgbaToRgb(rgba, w, h) {
  const out = new Uint8Array(w * h * 3);
  for (let i = 0, j = 0; i < w * h * 4; i += 4, j += 3) {
    const a = rgba[i + 3];
    if (a === 255) {
      out[j] = rgba[i];
      out[j + 1] = rgba[i + 1];
      out[j + 2] = rgba[i + 2];
      continue;
    }
    // Pillow AlphaComposite.c with an opaque white destination (7-bit fixed point).
    const outa255 = a * 255 + 255 * (255 - a);
    const coef1 = a === 0 ? 0 : Math.floor((a * 255 * 255 * 128) / outa255);
    const coef2 = 255 * 128 - coef1;
    for (let c = 0; c < 3; c++) {
      const t = rgba[i + c] * coef1 + 255 * coef2 + (0x80 << 7);
      out[j + c] = ((t >> 8) + t) >> 8 >> 7;
    }
  }
  return out;
}

// RGB (h, w, 3) -> the uint8 (S, S, 3) crop and float32 (3, S, S) model input. pillowMajor:
// the server's Pillow major version (GET /v1/model), which fixes the resize's pass order.
export function preprocessRgb(rgb, w, h, spec, pillowMajor = 13) {
  if (spec.resize_filter !== "bilinear") throw new Error(`unsupported filter ${spec.resize_filter}`);
  const [rw, rh] = resizedSize(w, h, spec.resize_px);
  const resized = rw === w && rh === h ? rgb : resizeBilinear(rgb, w, h, rw, rh, pillowMajor);
  const S = spec.image_size_px;
  const padW = Math.max(S - rw, 0), padH = Math.max(S - rh, 0);
  const fullW = rw + padW, fullH = rh + padH;
  const top = roundHalfEven((fullH - S) / 2) - Math.floor(padH / 2);
  const left = roundHalfEven((fullW - S) / 2) - Math.floor(padW / 2);
  const crop = new Uint8Array(S * S * 3); // zeros where the crop leaves the resized image
  for (let y = 0; y < S; y++) {
    const sy = y + top;
    if (sy < 0 || sy >= rh) continue;
    for (let x = 0; x < S; x++) {
      const sx = x + left;
      if (sx < 0 || sx >= rw) continue;
      const s = (sy * rw + sx) * 3, d = (y * S + x) * 3;
      crop[d] = resized[s];
      crop[d + 1] = resized[s + 1];
      crop[d + 2] = resized[s + 2];
    }
  }
  return { crop, input: normalize(crop, S, spec) };
}

// uint8 (S, S, 3) -> float32 (3, S, S): (x / 255 - mean) / std, each step rounded to float32.
export function normalize(crop, S, spec) {
  const f = Math.fround;
  const input = new Float32Array(3 * S * S);
  for (let c = 0; c < 3; c++) {
    const mean = f(spec.mean[c]), std = f(spec.std[c]);
    for (let i = 0; i < S * S; i++) {
      input[c * S * S + i] = f(f(f(crop[i * 3 + c] / 255) - mean) / std);
    }
  }
  return input;
}

// float32 (3, S, S) in the model's scaling -> RGBA bytes for ImageData (denormalize()).
export function denormalizeToRgba(chw, S, spec) {
  const f = Math.fround;
  const out = new Uint8ClampedArray(S * S * 4);
  for (let i = 0; i < S * S; i++) {
    for (let c = 0; c < 3; c++) {
      const unit = Math.min(Math.max(f(f(chw[c * S * S + i] * f(spec.std[c])) + f(spec.mean[c])), 0), 1);
      out[i * 4 + c] = roundHalfEven(f(unit * 255));
    }
    out[i * 4 + 3] = 255;
  }
  return out;
}

// Softmax in float64 and the k most probable labels, ties by label (as Predictor.top_k).
export function topK(logits, k, classNames) {
  let max = -Infinity;
  for (const v of logits) max = Math.max(max, v);
  const exps = Array.from(logits, (v) => Math.exp(v - max));
  const sum = exps.reduce((a, b) => a + b, 0);
  const order = exps.map((e, label) => ({ label, p: e / sum }));
  order.sort((a, b) => b.p - a.p || a.label - b.label);
  return order.slice(0, k).map(({ label, p }) => ({
    label, class_name: classNames[label], probability: p,
  }));
}

// A File/Blob -> RGB pixels, EXIF orientation applied, no colour management (as Pillow).
export async function decodeImage(blob) {
  const bitmap = await createImageBitmap(blob, {
    imageOrientation: "from-image", premultiplyAlpha: "none", colorSpaceConversion: "none",
  });
  const { width: w, height: h } = bitmap;
  const canvas = new OffscreenCanvas(w, h);
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  bitmap.close();
  const rgba = ctx.getImageData(0, 0, w, h).data;
  return { rgb: rgbaToRgb(rgba, w, h), width: w, height: h };
}
