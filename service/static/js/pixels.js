// Patch pixels in the browser: decode an uploaded image, turn it by a quarter turn exactly (array
// indices, no resampling), draw it, and encode it again for the API as an uncompressed TIFF (canvas
// PNGs carry an alpha channel, which the API refuses; TIFF needs no compressor).

/** {width, height, channels (1 or 3), data: Uint8Array of height*width*channels} */
export async function decodeImage(blob) {
  const bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const canvas = document.createElement("canvas");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  bitmap.close();
  const rgba = ctx.getImageData(0, 0, canvas.width, canvas.height, { colorSpace: "srgb" }).data;
  const n = canvas.width * canvas.height;
  let grey = true;
  for (let i = 0; i < n && grey; i++) {
    grey = rgba[4 * i] === rgba[4 * i + 1] && rgba[4 * i] === rgba[4 * i + 2];
  }
  const channels = grey ? 1 : 3;
  const data = new Uint8Array(n * channels);
  for (let i = 0; i < n; i++) {
    for (let c = 0; c < channels; c++) data[i * channels + c] = rgba[4 * i + c];
  }
  return { width: canvas.width, height: canvas.height, channels, data };
}

/** The image turned 90 degrees counter-clockwise (numpy's rot90): pixel (x, y) goes to (y, W-1-x). */
export function rotate90(image) {
  const { width: w, height: h, channels: c, data } = image;
  const out = new Uint8Array(data.length);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const src = (y * w + x) * c;
      const dst = ((w - 1 - x) * h + y) * c; // new width is h
      for (let k = 0; k < c; k++) out[dst + k] = data[src + k];
    }
  }
  return { width: h, height: w, channels: c, data: out };
}

/** Paint the image on a canvas at its own size (CSS scales it up without smoothing). */
export function drawImage(canvas, image) {
  canvas.width = image.width;
  canvas.height = image.height;
  const ctx = canvas.getContext("2d");
  const out = ctx.createImageData(image.width, image.height);
  const n = image.width * image.height;
  for (let i = 0; i < n; i++) {
    for (let k = 0; k < 3; k++) out.data[4 * i + k] = image.data[i * image.channels + (image.channels === 1 ? 0 : k)];
    out.data[4 * i + 3] = 255;
  }
  ctx.putImageData(out, 0, 0);
}

/** A baseline little-endian TIFF, one uncompressed strip: 8-bit greyscale or RGB. */
export function encodeTiff(image) {
  const { width, height, channels, data } = image;
  const entries = [
    [256, 4, 1, width], // ImageWidth
    [257, 4, 1, height], // ImageLength
    [258, 3, channels, null], // BitsPerSample: 8 each (inline for 1 channel, else at an offset)
    [259, 3, 1, 1], // Compression: none
    [262, 3, 1, channels === 1 ? 1 : 2], // PhotometricInterpretation: BlackIsZero or RGB
    [273, 4, 1, null], // StripOffsets
    [277, 3, 1, channels], // SamplesPerPixel
    [278, 4, 1, height], // RowsPerStrip
    [279, 4, 1, data.length], // StripByteCounts
    [284, 3, 1, 1], // PlanarConfiguration: chunky
  ];
  const ifdOffset = 8;
  const ifdSize = 2 + 12 * entries.length + 4;
  const bitsOffset = ifdOffset + ifdSize;
  const dataOffset = bitsOffset + (channels > 1 ? 2 * channels : 0);
  const buffer = new ArrayBuffer(dataOffset + data.length);
  const view = new DataView(buffer);
  view.setUint8(0, 0x49); // "II": little-endian
  view.setUint8(1, 0x49);
  view.setUint16(2, 42, true);
  view.setUint32(4, ifdOffset, true);
  view.setUint16(ifdOffset, entries.length, true);
  entries.forEach(([tag, type, count, value], i) => {
    const at = ifdOffset + 2 + 12 * i;
    view.setUint16(at, tag, true);
    view.setUint16(at + 2, type, true);
    view.setUint32(at + 4, count, true);
    if (tag === 258) {
      if (channels === 1) view.setUint16(at + 8, 8, true);
      else view.setUint32(at + 8, bitsOffset, true);
    } else if (tag === 273) {
      view.setUint32(at + 8, dataOffset, true);
    } else if (type === 3) {
      view.setUint16(at + 8, value, true);
    } else {
      view.setUint32(at + 8, value, true);
    }
  });
  view.setUint32(ifdOffset + 2 + 12 * entries.length, 0, true); // no next IFD
  for (let k = 0; k < channels && channels > 1; k++) view.setUint16(bitsOffset + 2 * k, 8, true);
  new Uint8Array(buffer, dataOffset).set(data);
  return new Blob([buffer], { type: "image/tiff" });
}
