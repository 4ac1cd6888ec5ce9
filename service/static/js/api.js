// Calls to the service's API. URLs are relative to the page, so that the page also works behind a
// reverse proxy that serves the service under a path prefix.

/** An error answered by the API (its JSON body's "error"), or a failure to reach it (status 0). */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.name = "ApiError";
    this.status = status;
  }

  /** The message for people: the API's own words, with the HTTP status. */
  describe() {
    return this.status ? `${this.message} (HTTP ${this.status})` : this.message;
  }
}

// The API key (bearer token) of a server with authentication on: typed in by the user, kept for the
// browser tab only (sessionStorage), sent with every call. Never part of a URL.
const KEY_STORAGE = "gsa-api-key";
let apiKey = sessionStorage.getItem(KEY_STORAGE) ?? "";
const unauthorizedListeners = [];

export function hasApiKey() {
  return apiKey !== "";
}

/** Use `key` for the next calls ("" forgets it). */
export function setApiKey(key) {
  apiKey = key.trim();
  if (apiKey) sessionStorage.setItem(KEY_STORAGE, apiKey);
  else sessionStorage.removeItem(KEY_STORAGE);
}

/** Call `listener(error)` whenever the server answers 401 (no key, or a key it does not know). */
export function onUnauthorized(listener) {
  unauthorizedListeners.push(listener);
}

/** fetch() that sends the API key and throws ApiError for network failures and non-2xx answers. */
export async function request(path, options = {}) {
  const headers = new Headers(options.headers ?? {});
  if (apiKey) headers.set("Authorization", `Bearer ${apiKey}`);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (err) {
    throw new ApiError(0, `The server could not be reached: ${err.message}`);
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText || "error"}`;
    try {
      const body = await response.json();
      if (body && typeof body.error === "string") message = body.error;
    } catch {
      // not JSON (a proxy's error page): keep the status line
    }
    const error = new ApiError(response.status, message);
    if (response.status === 401) unauthorizedListeners.forEach((listener) => listener(error));
    throw error;
  }
  return response;
}

/** A result file as an object URL (fetched with the key, so that <img> and downloads work with
 * authentication on); the caller revokes it. */
export async function objectURL(path) {
  return URL.createObjectURL(await (await request(path)).blob());
}

export async function getJSON(path, options) {
  return (await request(path, options)).json();
}

/** `v1/models/{name}[/versions/{v}]` */
export function modelPath(model) {
  const base = `v1/models/${encodeURIComponent(model.name)}`;
  return model.version ? `${base}/versions/${encodeURIComponent(model.version)}` : base;
}

export function metadataPath(model) {
  const base = `v2/models/${encodeURIComponent(model.name)}`;
  return model.version ? `${base}/versions/${encodeURIComponent(model.version)}` : base;
}

/** Classify one image (a File or Blob) with the model: the prediction of /predict. */
export async function predict(model, blob, filename, { resize = false, convert = false } = {}) {
  const form = new FormData();
  form.append("files", blob, filename);
  const query = new URLSearchParams();
  if (resize) query.set("resize", "true");
  if (convert) query.set("convert", "true");
  const qs = query.toString() ? `?${query}` : "";
  const answer = await getJSON(`${modelPath(model)}/predict${qs}`, { method: "POST", body: form });
  return answer.predictions[0];
}

export function jobPath(id, ...rest) {
  return [`v1/jobs/${encodeURIComponent(id)}`, ...rest.map(encodeURIComponent)].join("/");
}
