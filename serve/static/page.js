// bnfold's page for people: one card per served model, an image picker / drop zone, a drawing
// pad for grey single-channel models, and the top-k answer as bars.
//
// It uses only the endpoints any client uses: /v2/repository/index and /v2/models/{m} for the
// cards, POST /predictions/{m} for answers. Everything that comes from a model's metadata
// (names, labels, dataset, metrics keys) reaches the page through textContent or setAttribute
// on attributes that are never code; nothing is built with innerHTML, so a label such as
// `<img src=x onerror=...>` stays text.
"use strict";

// ------------------------------------------------------------------ small DOM helpers

/** An element with attributes (`text` sets textContent, `class` the class) and children. */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") node.textContent = String(value);
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  node.append(...children);   // strings become text nodes
  return node;
}

/** GET a JSON document; a non-2xx answer throws the service's own {"error"} message. */
async function getJSON(url) {
  const response = await fetch(url, {headers: {accept: "application/json"}});
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new Error(errorText(response, body));
  return body;
}

function errorText(response, body) {
  if (body && typeof body.error === "string") return body.error;
  return `HTTP ${response.status} ${response.statusText}`.trim();
}

function fmt(value) {
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return String(value);
  const abs = Math.abs(value);
  return abs !== 0 && (abs < 1e-3 || abs >= 1e5) ? value.toExponential(2) : value.toPrecision(4).replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, "");
}

function shape(dims) {
  return "[" + dims.map((d) => (d === -1 ? "batch" : String(d))).join(", ") + "]";
}

function parseJSON(text) {
  try { return JSON.parse(text); } catch { return null; }
}

// ------------------------------------------------------------------ the card's facts

/** The rows of a card's description list: [term, text] pairs, from metadata and spec. */
function facts(meta, spec, extra) {
  const rows = [];
  const params = meta.parameters || {};
  if (spec) {
    const args = Object.entries(spec.arch_kwargs || {}).map(([k, v]) => `${k}=${typeof v === "number" ? fmt(v) : JSON.stringify(v)}`);
    const kwargs = args.length ? ` (${args.join(", ")})` : "";
    rows.push(["Architecture", spec.arch + kwargs]);
    rows.push(["Task", `${spec.task}, trained on ${spec.dataset}` + (spec.epoch ? ` (epoch ${spec.epoch})` : "")]);
  }
  for (const t of meta.inputs || []) rows.push(["Input", `${t.name}: ${t.datatype} ${shape(t.shape)}`]);
  for (const t of meta.outputs || []) rows.push(["Output", `${t.name}: ${t.datatype} ${shape(t.shape)}`]);
  if (spec) {
    const p = spec.preprocess;
    const crop = p.crop ? `, crop ${p.crop.join("×")}` : "";
    const resize = Array.isArray(p.resize) ? p.resize.join("×") : `${p.resize} (shorter side)`;
    rows.push(["Preprocessing", `${p.mode === "L" ? "grey" : p.mode}, resize ${resize}${crop}`]);
    rows.push(["Mean / std", `${p.mean.map(fmt).join(", ")} / ${p.std.map(fmt).join(", ")}`]);
    const labels = spec.labels || [];
    const shown = labels.slice(0, 12).join(", ");
    rows.push([`Labels (${labels.length})`, labels.length > 12 ? `${shown}, … (${labels.length - 12} more)` : shown]);
    const metrics = Object.entries(spec.metrics || {});
    if (metrics.length) rows.push(["Training metrics", metrics.map(([k, v]) => `${k} ${fmt(v)}`).join(", ")]);
  }
  const fold = parseJSON(extra["bnfold.fold"] || "null");
  if (fold) {
    const skipped = (fold.skipped || []).map((s) => `${s.batchnorm}: ${s.reason}`);
    rows.push(["BatchNorm fold", `${fold.folded} folded, ${skipped.length} skipped` +
                                 (skipped.length ? ` (${skipped.join("; ")})` : "")]);
  } else if (extra["bnfold.folded"] !== undefined) {
    rows.push(["BatchNorm fold", extra["bnfold.folded"] === "true" ? "folded" : "not folded"]);
  }
  const parity = parseJSON(extra["bnfold.parity"] || "null");
  if (parity) {
    const top1 = parity.top1_agreement === null || parity.top1_agreement === undefined
      ? "" : `, top-1 agreement ${fmt(parity.top1_agreement)}`;
    rows.push(["Export parity", `max abs error ${fmt(parity.max_abs_error)}, max rel error ` +
                                `${fmt(parity.max_rel_error)}${top1} over ${parity.samples} samples`]);
  }
  if (extra["bnfold.weights_dtype"]) rows.push(["Weights", extra["bnfold.weights_dtype"]]);
  if (extra["bnfold.version"]) rows.push(["Exported by", `bnfold ${extra["bnfold.version"]}`]);
  // Anything else in the ONNX metadata (a model from elsewhere): shown as it is, shortened.
  const known = new Set(["bnfold.fold", "bnfold.folded", "bnfold.parity", "bnfold.weights_dtype", "bnfold.version"]);
  for (const [key, value] of Object.entries(extra)) {
    if (known.has(key)) continue;
    const text = String(value);
    rows.push([`Metadata ${key}`, text.length > 200 ? text.slice(0, 200) + "…" : text]);
  }
  const served = `${params.device || "?"}` + (params.providers ? ` (${params.providers.join(", ")})` : "");
  rows.push(["Served on", `${served}, version ${(meta.versions || ["?"]).join(", ")}`]);
  return rows;
}

function factList(rows) {
  const list = el("dl", {class: "facts"});
  for (const [term, text] of rows) list.append(el("dt", {text: term}), el("dd", {text}));
  return list;
}

// ------------------------------------------------------------------ the answer

function parseServerTiming(header) {
  const out = {};
  for (const part of (header || "").split(",")) {
    const match = /^\s*([\w-]+)\s*;.*dur=([\d.]+)/.exec(part);
    if (match) out[match[1]] = Number(match[2]);
  }
  return out;
}

/** The answer area: an error line, the top-k bars, what was done to the image, and the latency line. */
class Answer {
  constructor(id) {
    this.error = el("p", {class: "error", role: "alert", id: `${id}-error`, hidden: true});
    this.bars = el("ol", {class: "bars", id: `${id}-bars`, "aria-label": "top labels"});
    this.latency = el("p", {class: "latency", id: `${id}-latency`});
    this.note = el("p", {class: "image-note", id: `${id}-image-note`});
    this.warning = el("p", {class: "image-warning", role: "status", id: `${id}-image-warning`, hidden: true});
    this.node = el("div", {class: "answer", "aria-live": "polite"}, this.error, this.bars, this.warning,
                   this.note, this.latency);
  }

  busy() {
    this.node.setAttribute("aria-busy", "true");
  }

  fail(message) {
    this.node.removeAttribute("aria-busy");
    this.bars.replaceChildren();
    this.latency.textContent = "";
    this.note.textContent = "";
    this.warning.hidden = true;
    this.error.textContent = message;
    this.error.hidden = false;
  }

  show(predictions, timing, roundTripMs, image) {
    this.node.removeAttribute("aria-busy");
    this.error.hidden = true;
    this.error.textContent = "";
    this.bars.replaceChildren(...predictions.map((p) => {
      const percent = Math.max(0, Math.min(100, 100 * Number(p.probability)));
      const fill = el("span", {class: "fill"});
      fill.style.width = `${percent}%`;   // CSSOM, not an inline style attribute: allowed by the CSP
      return el("li", {class: "prediction"},
                el("span", {class: "label", text: p.label}),
                el("span", {class: "bar", "aria-hidden": "true"}, fill),
                el("span", {class: "probability", text: `${percent.toFixed(1)} %`}));
    }));
    const parts = [];
    if (timing.total !== undefined) parts.push(`server ${timing.total.toFixed(2)} ms`);
    if (timing.model !== undefined) parts.push(`model ${timing.model.toFixed(3)} ms`);
    parts.push(`round trip ${roundTripMs.toFixed(1)} ms`);
    this.latency.textContent = parts.join(" · ");
    // What the server did to the picture (the answer's "image"): the model saw it converted.
    const said = image ? `${image.width}x${image.height} ${image.mode} ${image.format || "image"}` : "";
    const steps = image && Array.isArray(image.conversions) ? image.conversions : [];
    this.note.textContent = image ? `sent ${said}: ${steps.length ? steps.join("; ") : "used as is"}` : "";
    this.warning.textContent = image && image.warning ? `warning: ${image.warning}` : "";
    this.warning.hidden = !(image && image.warning);
  }
}

// ------------------------------------------------------------------ the drawing pad

/** White ink on black, like the training digits; mouse, touch, pen or arrow keys. */
class DrawingPad {
  constructor(id, size = 224) {
    this.canvas = el("canvas", {id: `${id}-pad`, class: "pad", width: size, height: size, tabindex: 0,
                                role: "img", "aria-describedby": `${id}-pad-help`});
    this.pen = el("span", {class: "pen", "aria-hidden": "true"});
    this.node = el("div", {class: "pad-frame"}, this.canvas, this.pen);
    this.ctx = this.canvas.getContext("2d");
    this.ctx.lineCap = "round";
    this.ctx.lineJoin = "round";
    // Strokes about as thick as an upscaled 8x8 sklearn digit's.
    this.ctx.lineWidth = size / 10;
    this.ctx.strokeStyle = "#fff";
    this.at = {x: size / 2, y: size / 2};
    this.drawing = false;
    this.clear();
    this.canvas.addEventListener("pointerdown", (e) => this.down(e));
    this.canvas.addEventListener("pointermove", (e) => this.move(e));
    for (const kind of ["pointerup", "pointercancel"]) this.canvas.addEventListener(kind, () => { this.drawing = false; });
    this.canvas.addEventListener("keydown", (e) => this.key(e));
    this.placePen();
  }

  clear() {
    this.ctx.fillStyle = "#000";
    this.ctx.fillRect(0, 0, this.canvas.width, this.canvas.height);
  }

  point(e) {
    const box = this.canvas.getBoundingClientRect();
    return {x: (e.clientX - box.left) * this.canvas.width / box.width,
            y: (e.clientY - box.top) * this.canvas.height / box.height};
  }

  line(from, to) {
    this.ctx.beginPath();
    this.ctx.moveTo(from.x, from.y);
    this.ctx.lineTo(to.x + 0.01, to.y);   // a zero-length line draws nothing; a dot should show
    this.ctx.stroke();
  }

  down(e) {
    e.preventDefault();
    this.canvas.focus();
    this.canvas.setPointerCapture?.(e.pointerId);
    this.drawing = true;
    this.at = this.point(e);
    this.line(this.at, this.at);
    this.placePen();
  }

  move(e) {
    if (!this.drawing) return;
    const to = this.point(e);
    this.line(this.at, to);
    this.at = to;
    this.placePen();
  }

  /** Arrow keys draw (Shift+arrow moves the pen without ink); Delete clears; Enter submits. */
  key(e) {
    const step = this.canvas.width / 16;
    const moves = {ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step]};
    if (e.key in moves) {
      e.preventDefault();
      const [dx, dy] = moves[e.key];
      const clamp = (v, max) => Math.max(0, Math.min(max, v));
      const to = {x: clamp(this.at.x + dx, this.canvas.width), y: clamp(this.at.y + dy, this.canvas.height)};
      if (!e.shiftKey) this.line(this.at, to);
      this.at = to;
      this.placePen();
    } else if (e.key === "Delete" || e.key === "Backspace") {
      e.preventDefault();
      this.clear();
    } else if (e.key === "Enter" && this.onsubmit) {
      e.preventDefault();
      this.onsubmit();
    }
  }

  placePen() {
    this.pen.style.left = `${100 * this.at.x / this.canvas.width}%`;
    this.pen.style.top = `${100 * this.at.y / this.canvas.height}%`;
  }

  blob() {
    return new Promise((resolve) => this.canvas.toBlob(resolve, "image/png"));
  }
}

// ------------------------------------------------------------------ trying a model

function tryPanel(meta, spec, id) {
  const name = meta.name;
  const answer = new Answer(id);
  const classes = Math.max(1, (spec.labels || []).length);
  const topK = el("input", {id: `${id}-k`, type: "number", min: 1, max: classes, value: Math.min(5, classes),
                            inputmode: "numeric"});
  const preview = el("img", {class: "preview", id: `${id}-preview`, alt: "", hidden: true});
  let sequence = 0;   // answers that come back out of order: only the latest is shown

  async function classify(blob) {
    const mine = ++sequence;
    answer.busy();
    const k = Math.max(1, Math.min(classes, Math.floor(Number(topK.value)) || 5));
    const url = `/predictions/${encodeURIComponent(name)}?top_k=${k}`;
    const start = performance.now();
    try {
      const response = await fetch(url, {method: "POST", body: blob,
                                         headers: {"content-type": blob.type || "application/octet-stream"}});
      const roundTrip = performance.now() - start;
      const body = await response.json().catch(() => null);
      if (mine !== sequence) return;
      if (!response.ok || !body || !Array.isArray(body.predictions)) {
        answer.fail(errorText(response, body));
        return;
      }
      answer.show(body.predictions, parseServerTiming(response.headers.get("server-timing")), roundTrip,
                  body.image);
    } catch (error) {
      if (mine === sequence) answer.fail(`the service did not answer: ${error.message}`);
    }
  }

  function classifyFile(file) {
    if (!file) return;
    if (preview.src) URL.revokeObjectURL(preview.src);
    preview.src = URL.createObjectURL(file);
    preview.alt = `the image sent: ${file.name}`;
    preview.hidden = false;
    classify(file);
  }

  const file = el("input", {id: `${id}-file`, type: "file", accept: "image/png,image/jpeg,image/*"});
  file.addEventListener("change", () => classifyFile(file.files[0]));
  const drop = el("div", {class: "drop", id: `${id}-drop`},
                  el("label", {for: `${id}-file`, text: "Image file (PNG or JPEG)"}), file,
                  el("p", {class: "hint", text: "or drop an image here"}), preview);
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    classifyFile(e.dataTransfer.files[0]);
  });

  const sources = el("div", {class: "sources"}, drop);
  const grey = spec.preprocess.mode === "L" || (spec.input_shape || [])[0] === 1;
  if (grey) {
    const pad = new DrawingPad(id);
    const submit = async () => classify(await pad.blob());
    pad.onsubmit = submit;
    const classifyButton = el("button", {type: "button", id: `${id}-classify`, text: "Classify drawing"});
    const clearButton = el("button", {type: "button", id: `${id}-clear`, text: "Clear"});
    classifyButton.addEventListener("click", submit);
    clearButton.addEventListener("click", () => { pad.clear(); pad.canvas.focus(); });
    sources.append(el("div", {class: "draw"},
                      el("p", {class: "pad-title", id: `${id}-pad-title`, text: "Or draw (white ink on black)"}),
                      pad.node,
                      el("p", {class: "hint", id: `${id}-pad-help`,
                               text: "Mouse, finger or pen; or focus the pad and use the arrow keys " +
                                     "(Shift+arrow moves without ink, Delete clears, Enter classifies)."}),
                      el("div", {class: "buttons"}, classifyButton, clearButton)));
    pad.canvas.setAttribute("aria-labelledby", `${id}-pad-title`);
  }

  const options = el("p", {class: "options"}, el("label", {for: `${id}-k`, text: "Top k "}), topK);
  const origin = window.location.origin;
  const example = grey ? "digit.png" : "image.png";
  const curl = el("p", {class: "hint"}, "From a shell: ",
                  el("code", {text: `curl -T ${example} ${origin}/predictions/${encodeURIComponent(name)}`}));
  return el("div", {class: "try"}, sources, options, answer.node, curl);
}

function notePanel(meta, spec) {
  const name = meta.name;
  const input = (meta.inputs || [])[0];
  const tensors = `It takes tensors: POST /v2/models/${encodeURIComponent(name)}/infer` +
                  (input ? ` with ${input.name}, ${input.datatype} ${shape(input.shape)}.` : ".");
  if (!spec) {
    // The example options fit this model's input where its shape says them: [batch, C, H, W].
    const dims = input ? input.shape : [];
    const [channels, height, width] = dims.length === 4 ? dims.slice(1) : [-1, -1, -1];
    const size = height > 0 && width > 0 ? (height === width ? `${height}` : `${height},${width}`) : "H,W";
    const grey = channels === 1 ? " --grayscale" : "";
    return el("div", {class: "note"},
              el("p", {text: "This model carries no bnfold spec in its ONNX metadata, so the page cannot " +
                             "tell how to turn an image into its input. Give it one with the spec options " +
                             "--labels, --mean, --std, --input-size and --grayscale:"}),
              el("pre", {text: "bnfold fold-onnx model.onnx out.onnx --labels a,b,c --mean 0.5 --std 0.25 " +
                               `--input-size ${size}${grey}\nbnfold serve model.onnx --spec spec.json`}),
              el("p", {text: tensors}));
  }
  return el("div", {class: "note"},
            el("p", {text: `This is a ${spec.task} model: /predictions answers class labels for ` +
                           `classification models only. ${tensors}`}));
}

function card(meta, index) {
  const id = `model-${index}`;
  const params = meta.parameters || {};
  const spec = params.spec || null;
  const extra = params.metadata || {};
  const section = el("section", {class: "card", id, "aria-labelledby": `${id}-title`, "data-model": meta.name},
                     el("h2", {id: `${id}-title`, text: meta.name}),
                     factList(facts(meta, spec, extra)));
  section.append(spec && spec.task === "classification" ? tryPanel(meta, spec, id) : notePanel(meta, spec));
  return section;
}

async function main() {
  const status = document.getElementById("status");
  const list = document.getElementById("models");
  try {
    const index = await getJSON("/v2/repository/index");
    const metas = await Promise.all(index.map((m) => getJSON(`/v2/models/${encodeURIComponent(m.name)}`)));
    list.replaceChildren(...metas.map(card));
    status.textContent = `${metas.length} model${metas.length === 1 ? "" : "s"} served.`;
  } catch (error) {
    status.textContent = `Could not read the served models: ${error.message}`;
    status.classList.add("error");
  }
  document.body.dataset.ready = "true";   // for tests and scripts: the cards are built
}

main();
