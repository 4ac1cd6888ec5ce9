// A finished slide job's results: the heatmap over the thumbnail, the tile under a click or moved to
// with the arrow keys and its probabilities, the legend and the downloads.

import { ApiError, getJSON, jobPath, objectURL, request } from "./api.js";
import { formatNumber } from "./polar.js";

// the ramp of service/scoring/outputs.py (_colormap), for the legend
const RAMP = "linear-gradient(to right, rgb(49,54,149), rgb(69,170,210), rgb(255,230,100), rgb(215,25,28))";
const DOWNLOADS = [["tiles.csv", "Tiles (CSV)"], ["tiles.geojson", "Tiles (GeoJSON, QuPath)"],
  ["heatmap.png", "Heatmap (PNG)"], ["heatmap.npy", "Heatmap (NumPy)"], ["metadata.json", "Metadata (JSON)"]];
const STEPS = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };

function $(id) {
  return document.getElementById(id);
}

/** tiles.csv -> [{col, row, minx, miny, width, height, tissue, probs: {label: p}, predicted, orientation}] */
export function parseTiles(text) {
  const lines = text.trim().split("\n");
  const header = lines[0].split(",");
  const probColumns = header.map((name, i) => [name, i]).filter(([name]) => name.startsWith("prob_"));
  const at = Object.fromEntries(header.map((name, i) => [name, i]));
  return lines.slice(1).map((line) => {
    const f = line.split(",");
    const num = (name) => Number(f[at[name]]);
    return {
      col: num("col"), row: num("row"), minx: num("minx"), miny: num("miny"), width: num("width"),
      height: num("height"), tissue: num("tissue_fraction"), predicted: f[at.predicted],
      orientation: num("dominant_orientation_deg"),
      probs: Object.fromEntries(probColumns.map(([name, i]) => [name.slice("prob_".length), Number(f[i])])),
    };
  });
}

function probabilityList(probs) {
  const list = document.createElement("ol");
  list.className = "probs";
  for (const [label, p] of Object.entries(probs).sort((a, b) => b[1] - a[1])) {
    const li = document.createElement("li");
    li.dataset.label = label;
    li.dataset.probability = p;
    const name = Object.assign(document.createElement("span"), { className: "prob-name", textContent: label });
    const bar = Object.assign(document.createElement("span"), { className: "prob-bar" });
    bar.setAttribute("aria-hidden", "true");
    bar.appendChild(document.createElement("span")).style.width = `${(100 * p).toFixed(1)}%`;
    const value = Object.assign(document.createElement("span"), { className: "prob-value", textContent: formatNumber(p) });
    li.append(name, bar, value);
    list.appendChild(li);
  }
  return list;
}

export class HeatmapView {
  constructor(announce) {
    this.announce = announce;
    this.meta = null;
    this.tiles = [];
    this.byCell = new Map();
    this.selected = null;
    $("heatmap-img").addEventListener("click", (event) => this.onClick(event));
    $("heatmap").addEventListener("keydown", (event) => this.onKey(event));
  }

  /** Load and show a succeeded job's results; false (and a message) when they cannot be read. */
  async show(job) {
    try {
      const [meta, csv] = await Promise.all([
        getJSON(jobPath(job.id, "results", "metadata.json")),
        request(jobPath(job.id, "results", "tiles.csv")).then((r) => r.text()),
      ]);
      this.meta = meta;
      this.tiles = parseTiles(csv);
    } catch (err) {
      this.announce(`Could not load the job's results: ${err instanceof ApiError ? err.describe() : err.message}`, true);
      return false;
    }
    this.byCell = new Map(this.tiles.map((t) => [`${t.col},${t.row}`, t]));
    this.selected = null;
    const labels = this.meta.model.labels;
    const heatLabel = this.meta.options.heatmap_label ?? labels[labels.length - 1];
    const img = $("heatmap-img");
    img.alt = `Heatmap of the probability of ${heatLabel} over the thumbnail of ${this.meta.slide.name}`;
    $("heatmap").dataset.loaded = "false";
    img.onload = () => { $("heatmap").dataset.loaded = "true"; };
    if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
    try {
      img.src = await objectURL(jobPath(job.id, "results", "heatmap.png"));
    } catch (err) {
      this.announce(`Could not load the heatmap: ${err instanceof ApiError ? err.describe() : err.message}`, true);
    }
    $("tile-marker").hidden = true;
    $("tile-info").replaceChildren(Object.assign(document.createElement("p"), { className: "muted", textContent: "No tile selected." }));
    const ramp = Object.assign(document.createElement("span"), { className: "ramp" });
    ramp.style.background = RAMP;
    $("heatmap-legend").replaceChildren(`probability of ${heatLabel}: 0 `, ramp, " 1 · unscored tiles show the thumbnail");
    this.showDownloads(job);
    const c = this.meta.counts;
    $("job-summary").textContent = `${c.scored_tiles} tiles scored of ${c.grid_tiles} in the grid ` +
      `(${c.skipped_tiles} without enough tissue), ${this.meta.plan.tile_level0_px} px tiles at level 0, ` +
      `in ${this.meta.timing.total_s} s.`;
    return true;
  }

  showDownloads(job) {
    $("downloads").replaceChildren(...DOWNLOADS.filter(([name]) => job.results.includes(name)).map(([name, text]) => {
      const a = Object.assign(document.createElement("a"), {
        href: jobPath(job.id, "results", name), download: `${job.id.slice(0, 8)}-${name}`, textContent: text,
      });
      a.dataset.result = name;
      a.addEventListener("click", (event) => this.download(event, a));
      const li = document.createElement("li");
      li.appendChild(a);
      return li;
    }));
  }

  /** A download link, fetched with the API key (a plain link could not send it). */
  async download(event, a) {
    event.preventDefault();
    try {
      const url = await objectURL(a.getAttribute("href"));
      const save = Object.assign(document.createElement("a"), { href: url, download: a.download });
      document.body.appendChild(save);
      save.click();
      save.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
    } catch (err) {
      this.announce(`Could not download ${a.dataset.result}: ${err instanceof ApiError ? err.describe() : err.message}`, true);
    }
  }

  select(tile) {
    this.selected = tile;
    const [w, h] = this.meta.slide.dimensions;
    const marker = $("tile-marker");
    Object.assign(marker.style, {
      left: `${(100 * tile.minx) / w}%`, top: `${(100 * tile.miny) / h}%`,
      width: `${(100 * tile.width) / w}%`, height: `${(100 * tile.height) / h}%`,
    });
    marker.hidden = false;
    const info = $("tile-info");
    info.dataset.col = tile.col;
    info.dataset.row = tile.row;
    const head = Object.assign(document.createElement("p"), {
      className: "tile-head",
      textContent: `Column ${tile.col}, row ${tile.row} (x ${tile.minx}, y ${tile.miny}, ${tile.width} px at level 0): ` +
        `predicted ${tile.predicted}, tissue ${Math.round(100 * tile.tissue)}%, strongest orientation ${tile.orientation}°.`,
    });
    info.replaceChildren(head, probabilityList(tile.probs));
  }

  /** The scored tile under a level-0 point (the one whose centre is nearest, where tiles overlap). */
  tileAt(x, y) {
    let best = null;
    let bestDistance = Infinity;
    for (const t of this.tiles) {
      if (x < t.minx || y < t.miny || x >= t.minx + t.width || y >= t.miny + t.height) continue;
      const d = (x - t.minx - t.width / 2) ** 2 + (y - t.miny - t.height / 2) ** 2;
      if (d < bestDistance) [best, bestDistance] = [t, d];
    }
    return best;
  }

  onClick(event) {
    if (!this.meta) return;
    const img = event.currentTarget;
    const [w, h] = this.meta.slide.dimensions;
    const tile = this.tileAt((event.offsetX / img.clientWidth) * w, (event.offsetY / img.clientHeight) * h);
    if (tile) this.select(tile);
    else this.announce("No scored tile there (not enough tissue, or outside the grid).");
  }

  /** Arrow keys move to the next scored tile in that direction (cells without tissue are skipped). */
  onKey(event) {
    if (!this.tiles.length || !(event.key in STEPS)) return;
    event.preventDefault();
    if (!this.selected) {
      this.select(this.tiles[0]);
      return;
    }
    const [dx, dy] = STEPS[event.key];
    const { grid_cols: cols, grid_rows: rows } = this.meta.plan;
    let { col, row } = this.selected;
    for (;;) {
      col += dx;
      row += dy;
      if (col < 0 || row < 0 || col >= cols || row >= rows) return;
      const tile = this.byCell.get(`${col},${row}`);
      if (tile) {
        this.select(tile);
        return;
      }
    }
  }
}
