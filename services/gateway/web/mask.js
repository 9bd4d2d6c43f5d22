// The mask editor: a binary mask at the template's own resolution, painted with pointer events on a canvas
// scaled up with nearest-neighbour pixels, with brush, eraser, size and undo; exported in OpenAI's convention.

const OVERLAY = [224, 68, 62, 130]; // painted pixels as drawn over the template (RGBA)
const DISPLAY = 320; // CSS pixels of the longer side on screen

export class MaskEditor {
  constructor(templateCanvas, maskCanvas, onChange) {
    this.base = templateCanvas;
    this.canvas = maskCanvas;
    this.onChange = onChange || (() => {});
    this.erasing = false;
    this.size = 2;
    this.history = [];
    this.drawing = false;
    this.last = null;
    this.width = 0;
    this.height = 0;
    this.mask = new Uint8Array(0);
    maskCanvas.addEventListener('pointerdown', (e) => this._down(e));
    maskCanvas.addEventListener('pointermove', (e) => this._move(e));
    maskCanvas.addEventListener('pointerup', (e) => this._up(e));
    maskCanvas.addEventListener('pointercancel', (e) => this._up(e));
  }

  // Show `image` (decoded, at its natural size) and start an empty mask of its size.
  load(image) {
    this.width = image.naturalWidth;
    this.height = image.naturalHeight;
    this.mask = new Uint8Array(this.width * this.height);
    this.history = [];
    const scale = DISPLAY / Math.max(this.width, this.height);
    const cssW = Math.round(this.width * scale);
    const cssH = Math.round(this.height * scale);
    for (const c of [this.base, this.canvas]) {
      c.width = this.width;
      c.height = this.height;
      c.style.width = `${cssW}px`;
      c.style.height = `${cssH}px`;
    }
    const ctx = this.base.getContext('2d');
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(image, 0, 0);
    this._render();
  }

  get painted() {
    return this.mask.reduce((n, v) => n + v, 0);
  }

  undo() {
    if (this.history.length) {
      this.mask = this.history.pop();
      this._render();
    }
  }

  clear() {
    this.history.push(this.mask.slice());
    this.mask.fill(0);
    this._render();
  }

  // OpenAI's convention: fully transparent pixels are edited, opaque ones kept. Every pixel is exactly 0 or
  // 255 in alpha (set through ImageData, never anti-aliased), so the server reads exactly what was painted.
  toOpenAIMask() {
    const c = document.createElement('canvas');
    c.width = this.width;
    c.height = this.height;
    const ctx = c.getContext('2d');
    const data = ctx.createImageData(this.width, this.height);
    for (let i = 0; i < this.mask.length; i++) data.data[4 * i + 3] = this.mask[i] ? 0 : 255;
    ctx.putImageData(data, 0, 0);
    return new Promise((resolve) => c.toBlob(resolve, 'image/png'));
  }

  _pixel(e) {
    const r = this.canvas.getBoundingClientRect();
    const x = Math.floor(((e.clientX - r.left) / r.width) * this.width);
    const y = Math.floor(((e.clientY - r.top) / r.height) * this.height);
    return [Math.min(this.width - 1, Math.max(0, x)), Math.min(this.height - 1, Math.max(0, y))];
  }

  _down(e) {
    if (!this.width || e.button > 0) return;
    e.preventDefault();
    this.canvas.setPointerCapture(e.pointerId);
    this.history.push(this.mask.slice());
    if (this.history.length > 50) this.history.shift();
    this.drawing = true;
    this.last = this._pixel(e);
    this._dab(...this.last);
    this._render();
  }

  _move(e) {
    if (!this.drawing) return;
    const p = this._pixel(e);
    // Dabs along the segment since the last event, so a fast stroke leaves no gaps.
    const [x0, y0] = this.last;
    const n = Math.max(Math.abs(p[0] - x0), Math.abs(p[1] - y0), 1);
    for (let i = 1; i <= n; i++) {
      this._dab(Math.round(x0 + ((p[0] - x0) * i) / n), Math.round(y0 + ((p[1] - y0) * i) / n));
    }
    this.last = p;
    this._render();
  }

  _up(e) {
    if (!this.drawing) return;
    this.drawing = false;
    if (this.canvas.hasPointerCapture(e.pointerId)) this.canvas.releasePointerCapture(e.pointerId);
  }

  // A round dab `size` template pixels across, centred on (cx, cy).
  _dab(cx, cy) {
    const r = (this.size - 1) / 2;
    const value = this.erasing ? 0 : 1;
    for (let y = Math.floor(cy - r); y <= Math.ceil(cy + r); y++) {
      for (let x = Math.floor(cx - r); x <= Math.ceil(cx + r); x++) {
        if (x < 0 || y < 0 || x >= this.width || y >= this.height) continue;
        if ((x - cx) ** 2 + (y - cy) ** 2 <= r * r + 0.5) this.mask[y * this.width + x] = value;
      }
    }
  }

  _render() {
    const ctx = this.canvas.getContext('2d');
    const data = ctx.createImageData(this.width, this.height);
    for (let i = 0; i < this.mask.length; i++) {
      if (this.mask[i]) data.data.set(OVERLAY, 4 * i);
    }
    ctx.putImageData(data, 0, 0);
    this.onChange(this);
  }
}
