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

/** fetch() that throws ApiError for network failures and non-2xx answers. */
export async function request(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
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
    throw new ApiError(response.status, message);
  }
  return response;
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
