// Slides: submit a scoring job (upload, or a path in the server's data directory), reopen an earlier
// one, follow its progress (and cancel it), then hand the results to the heatmap view.

import { ApiError, getJSON, jobPath, request } from "./api.js";
import { HeatmapView } from "./heatmap.js";

const POLL_MS = 500;
const FINISHED = new Set(["succeeded", "failed", "cancelled"]);

function $(id) {
  return document.getElementById(id);
}

function errorText(err) {
  return err instanceof ApiError ? err.describe() : `Unexpected error: ${err.message}`;
}

class SlidePanel {
  constructor(getModel, announce) {
    this.getModel = getModel;
    this.announce = announce;
    this.job = null;
    this.timer = null;
    this.heatmap = new HeatmapView(announce);
    $("slide-upload-form").addEventListener("submit", (event) => this.submitUpload(event));
    $("slide-path-form").addEventListener("submit", (event) => this.submitPath(event));
    $("job-open-form").addEventListener("submit", (event) => this.openJob(event));
    $("jobs-refresh").addEventListener("click", () => this.refreshJobs());
    $("job-cancel").addEventListener("click", () => this.cancel());
    this.refreshJobs();
  }

  // ---- submitting ------------------------------------------------------------------------------
  async submitUpload(event) {
    event.preventDefault();
    const model = this.getModel();
    const file = $("slide-file").files[0];
    if (!model) return this.announce("Choose a model first.", true);
    if (!file) return this.announce("Choose a slide file to upload.", true);
    const query = new URLSearchParams({ model: model.name, filename: file.name });
    if (model.version) query.set("version", model.version);
    this.announce(`Uploading ${file.name} (${(file.size / 1e6).toFixed(1)} MB)…`);
    return this.submit(`v1/jobs/slides?${query}`, {
      method: "POST", body: file, headers: { "Content-Type": "application/octet-stream" },
    });
  }

  async submitPath(event) {
    event.preventDefault();
    const model = this.getModel();
    const path = $("slide-path").value.trim();
    if (!model) return this.announce("Choose a model first.", true);
    if (!path) return this.announce("Type a path inside the server's data directory.", true);
    const body = { model: model.name, path };
    if (model.version) body.version = model.version;
    return this.submit("v1/jobs/slides", {
      method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" },
    });
  }

  async submit(url, options) {
    try {
      const job = await getJSON(url, options);
      this.announce(`Job ${job.id.slice(0, 8)} queued for ${job.input.name}.`);
      this.follow(job);
      this.refreshJobs();
    } catch (err) {
      this.announce(`The slide job was not accepted: ${errorText(err)}`, true);
    }
  }

  // ---- earlier jobs ----------------------------------------------------------------------------
  async refreshJobs() {
    try {
      const { jobs } = await getJSON("v1/jobs?limit=200&order=desc");
      const slides = jobs.filter((j) => j.kind === "slide");
      $("job-select").replaceChildren(...(slides.length ? slides.map((j) => new Option(
        `${j.input.name} · ${j.model} · ${j.state} · ${new Date(j.created_at * 1000).toLocaleString()}`, j.id))
        : [new Option("(none)", "")]));
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) return;  // the key form asks for a key
      this.announce(`Could not list the jobs: ${errorText(err)}`, true);
    }
  }

  async openJob(event) {
    event.preventDefault();
    const id = $("job-select").value;
    if (!id) return this.announce("There is no earlier slide job to open.", true);
    try {
      this.follow(await getJSON(jobPath(id)));
    } catch (err) {
      this.announce(`Could not open the job: ${errorText(err)}`, true);
    }
  }

  // ---- following a job -------------------------------------------------------------------------
  async cancel() {
    if (!this.job) return;
    try {
      await request(jobPath(this.job.id), { method: "DELETE" });
      this.announce(`Cancelling job ${this.job.id.slice(0, 8)}…`);
    } catch (err) {
      this.announce(`Could not cancel the job: ${errorText(err)}`, true);
    }
  }

  follow(job) {
    clearTimeout(this.timer);
    this.job = job;
    $("job").hidden = false;
    $("job-results").hidden = true;
    $("job-title").textContent = `Job ${job.id.slice(0, 8)}: ${job.input.name} with ${job.model}`;
    this.show(job);
  }

  async show(job) {
    if (!this.job || this.job.id !== job.id) return; // another job was opened meanwhile
    this.job = job;
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
      this.timer = setTimeout(() => this.poll(), POLL_MS);
      return;
    }
    const short = job.id.slice(0, 8);
    if (job.state === "succeeded") {
      this.announce(`Job ${short} finished: ${total} tiles scored.`);
      $("job-results").hidden = !(await this.heatmap.show(job));
    } else if (job.state === "failed") {
      this.announce(`Job ${short} failed: ${job.error}`, true);
    } else {
      this.announce(`Job ${short} was cancelled.`);
    }
    this.refreshJobs();
  }

  async poll() {
    const id = this.job.id;
    try {
      await this.show(await getJSON(jobPath(id)));
    } catch (err) {
      this.announce(`Lost track of job ${id.slice(0, 8)}: ${errorText(err)}`, true);
    }
  }
}

/** Wire the slide section; getModel() gives the chosen {name, version} or null. */
export function setupSlides(getModel, announce) {
  return new SlidePanel(getModel, announce);
}
