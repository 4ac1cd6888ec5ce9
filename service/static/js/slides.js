// Slides: submit a scoring job (upload or a path in the data directory), follow its progress, then
// show the heatmap over the thumbnail; a click (or the arrow keys) on a tile shows its
// probabilities; the CSV and GeoJSON download from the job's results.

import { ApiError, getJSON, jobPath, request } from "./api.js";
import { formatNumber } from "./polar.js";

const POLL_MS = 500;
const FINISHED = new Set(["succeeded", "failed", "cancelled"]);
// the ramp of service/scoring/outputs.py (_colormap), for the legend
const RAMP = "linear-gradient(to right, rgb(49,54,149), rgb(69,170,210), rgb(255,230,100), rgb(215,25,28))";
const DOWNLOADS = [["tiles.csv", "Tiles (CSV)"], ["tiles.geojson", "Tiles (GeoJSON, QuPath)"],
  ["heatmap.png", "Heatmap (PNG)"], ["heatmap.npy", "Heatmap (NumPy)"], ["metadata.json", "Metadata (JSON)"]];

function $(id) {
  return document.getElementById(id);
}

function errorText(err) {
  return err instanceof ApiError ? err.describe() : `Unexpected error: ${err.message}`;
}

/** tiles.csv -> [{col, row, minx, miny, width, height, tissue, probs: {label: p}, predicted, orientation}] */
export function parseTiles(text) {
  const lines = text.trim().split("\n");
  const header = lines[0].split(",");
  const probColumns = header.map((name, i) => [name, i]).filter(([name]) => name.startsWith("prob_"));
  const at = (name) => header.indexOf(name);
  return lines.slice(1).map((line) => {
    const f = line.split(",");
    return {
      col: Number(f[at("col")]), row: Number(f[at("row")]), minx: Number(f[at("minx")]), miny: Number(f[at("miny")]),
      width: Number(f[at("width")]), height: Number(f[at("height")]), tissue: Number(f[at("tissue_fraction")]),
      probs: Object.fromEntries(probColumns.map(([name, i]) => [name.slice(5), Number(f[i])])),
      predicted: f[at("predicted")], orientation: Number(f[at("dominant_orientation_deg")]),
    };
  });
}

export function setupSlides(getModel, announce) {
  const state = { job: null, timer: null, tiles: [], byCell: new Map(), meta: null, selected: null };

  // ---- submitting ------------------------------------------------------------------------------
  $("slide-upload-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const model = getModel();
    const file = $("slide-file").files[0];
    if (!model) return announce("Choose a model first.", true);
    if (!file) return announce("Choose a slide file to upload.", true);
    const query = new URLSearchParams({ model: model.name, filename: file.name });
    if (model.version) query.set("version", model.version);
    announce(`Uploading ${file.name} (${(file.size / 1e6).toFixed(1)} MB)…`);
    await submit(`v1/jobs/slides?${query}`, { method: "POST", body: file, headers: { "Content-Type": "application/octet-stream" } });
  });

  $("slide-path-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const model = getModel();
    const path = $("slide-path").value.trim();
    if (!model) return announce("Choose a model first.", true);
    if (!path) return announce("Type a path inside the server's data directory.", true);
    const body = { model: model.name, path };
    if (model.version) body.version = model.version;
    await submit("v1/jobs/slides", { method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" } });
  });

  async function submit(url, options) {
    try {
      const job = await getJSON(url, options);
      announce(`Job ${job.id.slice(0, 8)} queued for ${job.input.name}.`);
      follow(job);
      refreshJobs();
    } catch (err) {
      announce(`The slide job was not accepted: ${errorText(err)}`, true);
    }
  }

  // ---- earlier jobs ----------------------------------------------------------------------------
  async function refreshJobs() {
    try {
      const { jobs } = await getJSON("v1/jobs");
      const select = $("job-select");
      const slides = jobs.filter((j) => j.kind === "slide").reverse();
      select.replaceChildren(...(slides.length ? slides.map((j) => new Option(
        `${j.input.name} · ${j.model} · ${j.state} · ${new Date(j.created_at * 1000).toLocaleString()}`, j.id))
        : [new Option("(none)", "")]));
    } catch (err) {
      announce(`Could not list the jobs: ${errorText(err)}`, true);
    }
  }
  $("jobs-refresh").addEventListener("click", refreshJobs);
  $("job-open-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const id = $("job-select").value;
    if (!id) return announce("There is no earlier slide job to open.", true);
    try {
      follow(await getJSON(jobPath(id)));
    } catch (err) {
      announce(`Could not open the job: ${errorText(err)}`, true);
    }
  });

  // ---- following a job -------------------------------------------------------------------------
  $("job-cancel").addEventListener("click", async () => {
    if (!state.job) return;
    try {
      await request(jobPath(state.job.id), { method: "DELETE" });
      announce(`Cancelling job ${state.job.id.slice(0, 8)}…`);
    } catch (err) {
      announce(`Could not cancel the job: ${errorText(err)}`, true);
    }
  });

  function follow(job) {
    clearTimeout(state.timer);
    state.job = job;
    $("job").hidden = false;
    $("job-results").hidden = true;
    $("job-title").textContent = `Job ${job.id.slice(0, 8)}: ${job.input.name} with ${job.model}`;
    show(job);
  }

  async function show(job) {
    if (!state.job || state.job.id !== job.id) return; // another job was opened meanwhile
    state.job = job;
    const node = $("job");
    node.dataset.state = job.state;
    node.dataset.jobId = job.id;
    const { done, total } = job.progress;
    const bar = $("job-progress");
    bar.max = total || 1;
    bar.value = total ? done : 0;
    const percent = total ? ` (${Math.floor((100 * done) / total)}%)` : "";
    const counts = total !== null ? `: ${done} of ${total} tiles${percent}` : "";
    $("job-state").textContent = `${job.state}${counts}${job.error ? ` — ${job.error}` : ""}`;
    $("job-cancel").hidden = FINISHED.has(job.state);
    if (!FINISHED.has(job.state)) {
      state.timer = setTimeout(poll, POLL_MS);
      return;
    }
    if (job.state === "succeeded") {
      announce(`Job ${job.id.slice(0, 8)} finished: ${total} tiles scored.`);
      await showResults(job);
    } else if (job.state === "failed") {
      announce(`Job ${job.id.slice(0, 8)} failed: ${job.error}`, true);
    } else {
      announce(`Job ${job.id.slice(0, 8)} was cancelled.`);
    }
    refreshJobs();
  }

  async function poll() {
    const id = state.job.id;
    try {
      show(await getJSON(jobPath(id)));
    } catch (err) {
      announce(`Lost track of job ${id.slice(0, 8)}: ${errorText(err)}`, true);
    }
  }

  // ---- results ---------------------------------------------------------------------------------
  async function showResults(job) {
    try {
      const [meta, csv] = await Promise.all([
        getJSON(jobPath(job.id, "results", "metadata.json")),
        request(jobPath(job.id, "results", "tiles.csv")).then((r) => r.text()),
      ]);
      state.meta = meta;
      state.tiles = parseTiles(csv);
      state.byCell = new Map(state.tiles.map((t) => [`${t.col},${t.row}`, t]));
      state.selected = null;
    } catch (err) {
      announce(`Could not load the job's results: ${errorText(err)}`, true);
      return;
    }
    const labels = state.meta.model.labels ?? Object.keys(state.tiles[0]?.probs ?? {});
    const heatLabel = state.meta.options.heatmap_label ?? labels[labels.length - 1];
    const img = $("heatmap-img");
    img.alt = `Heatmap of the probability of ${heatLabel} over the thumbnail of ${state.meta.slide.name}`;
    $("heatmap").dataset.loaded = "false";
    img.onload = () => { $("heatmap").dataset.loaded = "true"; };
    img.src = jobPath(job.id, "results", "heatmap.png");
    $("tile-marker").hidden = true;
    $("tile-info").replaceChildren(Object.assign(document.createElement("p"), { className: "muted", textContent: "No tile selected." }));
    const legend = $("heatmap-legend");
    legend.replaceChildren();
    const bar = document.createElement("span");
    bar.className = "ramp";
    bar.style.background = RAMP;
    legend.append(`probability of ${heatLabel}: 0 `, bar, " 1 · unscored tiles show the thumbnail");
    $("downloads").replaceChildren(...DOWNLOADS.filter(([name]) => job.results.includes(name)).map(([name, text]) => {
      const a = document.createElement("a");
      a.href = jobPath(job.id, "results", name);
      a.download = `${job.id.slice(0, 8)}-${name}`;
      a.textContent = text;
      a.dataset.result = name;
      const li = document.createElement("li");
      li.appendChild(a);
      return li;
    }));
    const c = state.meta.counts;
    $("job-summary").textContent = `${c.scored_tiles} tiles scored of ${c.grid_tiles} in the grid ` +
      `(${c.skipped_tiles} without enough tissue), ${state.meta.plan.tile_level0_px} px tiles at level 0, ` +
      `in ${state.meta.timing.total_s} s.`;
    $("job-results").hidden = false;
  }

  function select(tile) {
    state.selected = tile;
    const [w, h] = state.meta.slide.dimensions;
    const marker = $("tile-marker");
    Object.assign(marker.style, {
      left: `${(100 * tile.minx) / w}%`, top: `${(100 * tile.miny) / h}%`,
      width: `${(100 * tile.width) / w}%`, height: `${(100 * tile.height) / h}%`,
    });
    marker.hidden = false;
    const info = $("tile-info");
    info.dataset.col = tile.col;
    info.dataset.row = tile.row;
    const list = document.createElement("ol");
    list.className = "probs";
    for (const [label, p] of Object.entries(tile.probs).sort((a, b) => b[1] - a[1])) {
      const li = document.createElement("li");
      li.dataset.label = label;
      li.dataset.probability = p;
      li.innerHTML = `<span class="prob-name"></span><span class="prob-bar" aria-hidden="true"><span style="width:${(100 * p).toFixed(1)}%"></span></span><span class="prob-value"></span>`;
      li.querySelector(".prob-name").textContent = label;
      li.querySelector(".prob-value").textContent = formatNumber(p);
      list.appendChild(li);
    }
    const head = document.createElement("p");
    head.className = "tile-head";
    head.textContent = `Column ${tile.col}, row ${tile.row} (x ${tile.minx}, y ${tile.miny}, ${tile.width} px at level 0): ` +
      `predicted ${tile.predicted}, tissue ${Math.round(100 * tile.tissue)}%, strongest orientation ${tile.orientation}°.`;
    info.replaceChildren(head, list);
  }

  /** The scored tile under a level-0 point (the one whose centre is nearest, where tiles overlap). */
  function tileAt(x, y) {
    let best = null;
    let bestDistance = Infinity;
    for (const t of state.tiles) {
      if (x < t.minx || y < t.miny || x >= t.minx + t.width || y >= t.miny + t.height) continue;
      const d = (x - t.minx - t.width / 2) ** 2 + (y - t.miny - t.height / 2) ** 2;
      if (d < bestDistance) [best, bestDistance] = [t, d];
    }
    return best;
  }

  $("heatmap-img").addEventListener("click", (event) => {
    if (!state.meta) return;
    const img = event.currentTarget;
    const [w, h] = state.meta.slide.dimensions;
    const tile = tileAt((event.offsetX / img.clientWidth) * w, (event.offsetY / img.clientHeight) * h);
    if (tile) select(tile);
    else announce("No scored tile there (not enough tissue, or outside the grid).");
  });

  $("heatmap").addEventListener("keydown", (event) => {
    const steps = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
    if (!state.tiles.length || !(event.key in steps)) return;
    event.preventDefault();
    if (!state.selected) return select(state.tiles[0]);
    const [dx, dy] = steps[event.key];
    const { grid_cols: cols, grid_rows: rows } = state.meta.plan;
    let { col, row } = state.selected;
    for (;;) { // skip cells without a scored tile
      col += dx;
      row += dy;
      if (col < 0 || row < 0 || col >= cols || row >= rows) return;
      const tile = state.byCell.get(`${col},${row}`);
      if (tile) return select(tile);
    }
  });

  refreshJobs();
}
