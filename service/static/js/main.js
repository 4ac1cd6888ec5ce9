// The page's entry point: the model picker, the message area, and the patch and slide sections.

import { ApiError, getJSON, hasApiKey, metadataPath, onUnauthorized, setApiKey } from "./api.js";
import { setupPatches } from "./patches.js";
import { setupSlides } from "./slides.js";

const RETRY_MS = 1000;
const modelSelect = document.getElementById("model");
const versionSelect = document.getElementById("version");
const modelInfo = document.getElementById("model-info");
const messages = document.getElementById("messages");
let models = [];

/** Tell the user (the region is aria-live: screen readers read it out). */
function announce(text, isError = false) {
  messages.textContent = text;
  messages.classList.toggle("is-error", isError);
  messages.dataset.kind = isError ? "error" : "info";
}

/** The chosen model as {name, version} (version null: the newest ready one), or null. */
function chosenModel() {
  return modelSelect.value ? { name: modelSelect.value, version: versionSelect.value || null } : null;
}

// A server with authentication on answers 401 until a key is given: ask for one, then start again
const keyForm = document.getElementById("key-form");
let slides = null;
onUnauthorized((err) => {
  keyForm.hidden = false;
  announce(`${err.describe()}: type an API key above.`, true);
  document.getElementById("api-key").focus();
});
keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const input = document.getElementById("api-key");
  if (!input.value.trim()) return announce("Type the API key first.", true);
  setApiKey(input.value);
  input.value = "";
  announce("Using the API key for this tab.");
  loadModels();
  slides?.refreshJobs();
});
document.getElementById("key-forget").addEventListener("click", () => {
  setApiKey("");
  announce("The API key is forgotten.");
});
if (hasApiKey()) keyForm.hidden = false;

async function loadModels() {
  try {
    ({ models } = await getJSON("v1/models"));
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return;  // the key form is shown
    announce(`Could not list the models: ${err instanceof ApiError ? err.describe() : err.message}. Retrying…`, true);
    setTimeout(loadModels, RETRY_MS);
    return;
  }
  const previous = modelSelect.value;
  modelSelect.replaceChildren(...models.map((m) => new Option(m.name, m.name)));
  if (!models.length) {
    modelSelect.replaceChildren(new Option("(no models in the repository)", ""));
    announce("The server has no models: put them in its model directory (GSA_MODEL_DIR).", true);
    return;
  }
  modelSelect.disabled = false;
  if (previous && models.some((m) => m.name === previous)) modelSelect.value = previous;
  fillVersions();
  // versions still loading: look again until each one is ready or failed
  if (models.some((m) => m.versions.some((v) => v.state === "LOADING" || v.state === "UNLOADED"))) {
    setTimeout(loadModels, RETRY_MS);
  }
}

function fillVersions() {
  const model = models.find((m) => m.name === modelSelect.value);
  const previous = versionSelect.value;
  const options = [new Option(model.default_version ? `newest ready (${model.default_version})` : "newest ready", "")];
  for (const v of model.versions) options.push(new Option(`${v.version} (${v.state.toLowerCase()})`, v.version));
  versionSelect.replaceChildren(...options);
  versionSelect.disabled = false;
  if ([...versionSelect.options].some((o) => o.value === previous)) versionSelect.value = previous;
  describeModel();
}

async function describeModel() {
  const model = chosenModel();
  if (!model) return;
  try {
    const meta = await getJSON(metadataPath(model));
    if (chosenModel()?.name !== model.name) return;
    const card = meta.card ?? {};
    const input = card.input ?? {};
    const colour = input.channels === 1 ? "greyscale" : input.channels === 3 ? "RGB" : `${input.channels} channels`;
    const group = meta.group ? `group ${meta.group.name} (${meta.group.elements.length} elements` +
      `${meta.group.elements.some((e) => e.reflection) ? ", with mirrors" : ""})` : "no group";
    const mpp = card.mpp ? `${card.mpp} µm/px (slides: yes)` : "no mpp (patches only)";
    const state = meta.state === "READY" ? "" : ` — ${meta.state.toLowerCase()}${meta.reason ? `: ${meta.reason}` : ""}`;
    modelInfo.textContent = `${meta.name} v${card.version ?? "?"}: ${input.width}×${input.height} ${colour}, ${group}, ` +
      `${meta.labels.length} labels (${meta.labels.slice(0, 6).join(", ")}${meta.labels.length > 6 ? ", …" : ""}), ${mpp}${state}`;
    modelInfo.dataset.model = meta.name;
  } catch (err) {
    modelInfo.textContent = `${model.name}: ${err instanceof ApiError ? err.describe() : err.message}`;
  }
}

modelSelect.addEventListener("change", fillVersions);
versionSelect.addEventListener("change", describeModel);
setupPatches(chosenModel, announce);
slides = setupSlides(chosenModel, announce);
loadModels();
