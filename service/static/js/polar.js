// The polar plot of orientation responses, drawn as SVG: one spoke per group element at the
// element's angle (counter-clockwise from the right, as on the card), its length the response
// rescaled to the plot, mirrored elements dashed with a hollow marker.

const SVG = "http://www.w3.org/2000/svg";
const R = 100; // outer radius in SVG units
const MIN_LENGTH = 0.12; // the weakest response still shows as a stub

function el(name, attrs = {}, parent = null) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (parent) parent.appendChild(node);
  return node;
}

function point(angleDeg, radius) {
  const a = (angleDeg * Math.PI) / 180;
  return [radius * Math.cos(a), -radius * Math.sin(a)]; // SVG's y axis points down
}

export function formatNumber(x) {
  return Math.abs(x) >= 100 || (Math.abs(x) < 0.01 && x !== 0) ? x.toExponential(2) : x.toFixed(3);
}

function angleText(element) {
  return `${Math.round(element.angle * 100) / 100}°${element.reflection ? " mirrored" : ""}`;
}

/**
 * Draw the responses of one class.
 * @param {HTMLElement} container emptied and filled with the plot and a table of the numbers
 * @param {{index:number, angle:number, reflection:boolean}[]} elements the group's elements
 * @param {number[]} responses one per element
 * @param {string} label the class the responses belong to
 */
export function renderPolar(container, elements, responses, label) {
  container.replaceChildren();
  const lo = Math.min(...responses);
  const hi = Math.max(...responses);
  const strongest = responses.indexOf(hi);
  const scale = (v) => (hi > lo ? MIN_LENGTH + (1 - MIN_LENGTH) * ((v - lo) / (hi - lo)) : 1);

  const svg = el("svg", {
    viewBox: `${-R - 34} ${-R - 22} ${2 * R + 68} ${2 * R + 44}`, class: "polar", role: "img",
    "aria-label": `Orientation responses of class ${label}: strongest at ${angleText(elements[strongest])} ` +
      `(${formatNumber(hi)}), weakest ${formatNumber(lo)}`,
  });
  for (const f of [0.25, 0.5, 0.75, 1]) el("circle", { r: R * f, class: "polar-ring" }, svg);

  elements.forEach((element) => {
    const [ax, ay] = point(element.angle, R);
    el("line", { x1: 0, y1: 0, x2: ax, y2: ay, class: "polar-axis" }, svg);
    if (!element.reflection) {
      const [tx, ty] = point(element.angle, R + 16);
      const text = el("text", { x: tx, y: ty, class: "polar-label", "text-anchor": "middle", "dominant-baseline": "middle" }, svg);
      text.textContent = `${Math.round(element.angle)}°`;
    }
  });
  const tips = elements.map((element, i) => point(element.angle, scale(responses[i]) * R));
  const outline = tips.filter((_, i) => !elements[i].reflection);
  if (outline.length > 2) el("polygon", { points: outline.map((p) => p.join(",")).join(" "), class: "polar-outline" }, svg);

  const spokes = el("g", { class: "polar-spokes" }, svg);
  elements.forEach((element, i) => {
    const value = responses[i];
    const [x, y] = tips[i];
    const g = el("g", {
      class: `spoke${element.reflection ? " mirrored" : ""}${i === strongest ? " strongest" : ""}`,
      "data-element": element.index, "data-angle": element.angle, "data-reflection": element.reflection,
      "data-response": value,
    }, spokes);
    el("title", {}, g).textContent = `${angleText(element)}: ${formatNumber(value)}`;
    el("line", { x1: 0, y1: 0, x2: x, y2: y, class: "spoke-line" }, g);
    if (element.reflection) {
      el("rect", { x: x - 4.5, y: y - 4.5, width: 9, height: 9, class: "spoke-tip", transform: `rotate(45 ${x} ${y})` }, g);
    } else {
      el("circle", { cx: x, cy: y, r: 4.5, class: "spoke-tip" }, g);
    }
  });
  container.appendChild(svg);

  const table = document.createElement("table");
  table.className = "responses";
  const caption = table.createCaption();
  caption.textContent = `Responses of class ${label}`;
  const head = table.createTHead().insertRow();
  for (const h of ["element", "angle", "response"]) {
    const th = document.createElement("th");
    th.scope = "col";
    th.textContent = h;
    head.appendChild(th);
  }
  const body = table.createTBody();
  elements.forEach((element, i) => {
    const row = body.insertRow();
    if (i === strongest) row.className = "strongest";
    row.insertCell().textContent = String(element.index);
    row.insertCell().textContent = angleText(element);
    row.insertCell().textContent = formatNumber(responses[i]);
  });
  const details = document.createElement("details");
  const summary = document.createElement("summary");
  summary.textContent = "Numbers";
  details.append(summary, table);
  container.appendChild(details);
}
