// Patches: classify dropped or chosen images, show label, probabilities and the polar plot of the
// orientation responses, and rotate a patch by a quarter turn to watch the responses turn with it.

import { ApiError, predict } from "./api.js";
import { decodeImage, drawImage, encodeTiff, rotate90 } from "./pixels.js";
import { formatNumber, renderPolar } from "./polar.js";

const MAX_PROBABILITIES = 10; // classes listed per patch (the most probable ones)
let nextId = 0;

function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("data-") || k.startsWith("aria-") || k === "role" || k === "for" || k === "style") node.setAttribute(k, v);
    else node[k] = v;
  }
  node.append(...children);
  return node;
}

function errorText(err) {
  return err instanceof ApiError ? err.describe() : `Unexpected error: ${err.message}`;
}

/** One patch card: its pixels, its model and options, how far it has been turned. */
class Patch {
  constructor(file, model, options, announce) {
    this.id = `patch-${nextId++}`;
    this.file = file;
    this.model = model;
    this.options = options;
    this.announce = announce;
    this.image = null; // decoded pixels, once the browser could decode the file
    this.rotation = 0;
    this.plotLabel = null; // the class whose responses are plotted (the first prediction's label)
    this.prediction = null;
    this.node = this.build();
  }

  build() {
    const id = this.id;
    this.canvas = h("canvas", { class: "patch-image", role: "img", "aria-label": `Patch ${this.file.name}` });
    this.preview = h("figure", { class: "patch-figure" }, this.canvas,
      h("figcaption", { class: "rotation-text muted", text: "as uploaded" }));
    this.labelText = h("strong", { class: "pred-label" });
    this.scoreText = h("span", { class: "pred-score muted" });
    this.probs = h("ol", { class: "probs", "aria-label": "Probabilities" });
    this.plotSelect = h("select", { id: `${id}-plot`, class: "plot-label" });
    this.plotSelect.addEventListener("change", () => {
      this.plotLabel = this.plotSelect.value;
      this.renderPlot();
    });
    this.polar = h("div", { class: "polar-box" });
    this.dominant = h("p", { class: "dominant muted" });
    this.rotateButton = h("button", { type: "button", class: "rotate", text: "Rotate 90°", disabled: true,
      title: "Turn the patch a quarter turn counter-clockwise and classify it again" });
    this.rotateButton.addEventListener("click", () => this.rotate());
    const remove = h("button", { type: "button", class: "remove", text: "Remove", "aria-label": `Remove ${this.file.name}` });
    remove.addEventListener("click", () => this.node.remove());
    this.error = h("p", { class: "error", hidden: true }); // read out by the page's live region
    this.busy = h("p", { class: "busy muted", text: "Classifying…" });
    const result = h("div", { class: "patch-result" },
      h("p", { class: "label-line" }, "Label ", this.labelText, " ", this.scoreText),
      h("div", { class: "patch-columns" }, this.probs,
        h("div", { class: "polar-column" },
          h("div", { class: "plot-head" }, h("label", { for: `${id}-plot`, text: "Responses of class" }), this.plotSelect),
          this.polar, this.dominant)));
    this.result = result;
    result.hidden = true;
    return h("li", { class: "patch-card card", id, "data-state": "pending", "data-rotation": "0",
      "aria-labelledby": `${id}-title` },
    h("div", { class: "patch-head" },
      h("h3", { id: `${id}-title`, text: this.file.name }),
      h("span", { class: "muted model-name", text: `${this.model.name}${this.model.version ? ` v${this.model.version}` : ""}` })),
    h("div", { class: "patch-body" },
      h("div", { class: "patch-left" }, this.preview, h("div", { class: "patch-buttons" }, this.rotateButton, remove)),
      h("div", { class: "patch-right" }, this.busy, this.error, result)));
  }

  async start() {
    const ok = await this.classify(this.file, this.file.name);
    try {
      this.image = await decodeImage(this.file);
      drawImage(this.canvas, this.image);
    } catch {
      this.preview.replaceChildren(h("p", { class: "muted no-preview", text: "No preview: the browser cannot decode this file (rotating needs PNG or JPEG)." }));
    }
    this.rotateButton.disabled = !(ok && this.image);
  }

  async classify(blob, filename) {
    this.node.dataset.state = "pending";
    this.busy.hidden = false;
    this.error.hidden = true;
    try {
      const prediction = await predict(this.model, blob, filename, this.options);
      this.prediction = prediction;
      this.render();
      this.node.dataset.state = "done";
      return true;
    } catch (err) {
      this.error.textContent = `Could not classify ${filename}: ${errorText(err)}`;
      this.error.hidden = false;
      this.node.dataset.state = "error";
      this.announce(this.error.textContent, true);
      return false;
    } finally {
      this.busy.hidden = true;
    }
  }

  async rotate() {
    if (!this.image) return;
    this.rotateButton.disabled = true;
    const turned = rotate90(this.image);
    const rotation = (this.rotation + 90) % 360;
    const stem = this.file.name.replace(/\.[^.]*$/, "");
    const ok = await this.classify(encodeTiff(turned), `${stem}-rot${rotation}.tif`);
    if (ok) {
      this.image = turned;
      this.rotation = rotation;
      drawImage(this.canvas, turned);
      this.preview.querySelector("figcaption").textContent =
        rotation ? `turned ${rotation}° counter-clockwise` : "as uploaded (turned 360°)";
      this.canvas.setAttribute("aria-label", `Patch ${this.file.name}, turned ${rotation}° counter-clockwise`);
      this.node.dataset.rotation = String(rotation);
      this.announce(`${this.file.name} turned to ${rotation}°: label ${this.prediction.label}`);
    }
    this.rotateButton.disabled = false;
  }

  render() {
    const p = this.prediction;
    this.labelText.textContent = p.label;
    this.scoreText.textContent = `(probability ${formatNumber(p.score)})`;
    const ranked = Object.entries(p.probabilities).sort((a, b) => b[1] - a[1]).slice(0, MAX_PROBABILITIES);
    this.probs.replaceChildren(...ranked.map(([label, value]) => h("li", { "data-label": label, "data-probability": value },
      h("span", { class: "prob-name", text: label }),
      h("span", { class: "prob-bar", "aria-hidden": "true" }, h("span", { style: `width:${(100 * value).toFixed(1)}%` })),
      h("span", { class: "prob-value", text: formatNumber(value) }))));
    const labels = Object.keys(p.orientation.responses);
    if (this.plotLabel === null || !labels.includes(this.plotLabel)) this.plotLabel = p.label;
    if (this.plotSelect.options.length !== labels.length) {
      this.plotSelect.replaceChildren(...labels.map((label) => h("option", { value: label, text: label })));
    }
    this.plotSelect.value = this.plotLabel;
    const d = p.dominant_element;
    this.dominant.textContent = `Strongest orientation of class ${p.label}: ${d.angle}°${d.reflection ? " mirrored" : ""} (group ${p.orientation.group}).`;
    this.renderPlot();
    this.result.hidden = false;
  }

  renderPlot() {
    const p = this.prediction;
    renderPolar(this.polar, p.orientation.elements, p.orientation.responses[this.plotLabel], this.plotLabel);
    if (p.orientation.elements.some((e) => e.reflection)) {
      this.polar.appendChild(h("p", { class: "muted legend-line", text: "● rotation · ◇ dashed: mirrored element" }));
    }
  }
}

/** Wire the patch section; getModel() gives the chosen {name, version} or null. */
export function setupPatches(getModel, announce) {
  const list = document.getElementById("patch-list");
  const input = document.getElementById("patch-files");
  const zone = document.getElementById("drop-zone");
  const resize = document.getElementById("opt-resize");
  const convert = document.getElementById("opt-convert");

  function addFiles(files) {
    const model = getModel();
    if (!model) {
      announce("Choose a model first.", true);
      return;
    }
    for (const file of files) {
      const patch = new Patch(file, model, { resize: resize.checked, convert: convert.checked }, announce);
      list.appendChild(patch.node);
      patch.start();
    }
    if (files.length) announce(`Classifying ${files.length} patch${files.length > 1 ? "es" : ""} with ${model.name}…`);
  }

  input.addEventListener("change", () => {
    addFiles([...input.files]);
    input.value = "";
  });
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    addFiles([...event.dataTransfer.files]);
  });
  document.getElementById("clear-patches").addEventListener("click", () => list.replaceChildren());
}
