// productbg — ComfyUI frontend extension: the category widget of Category, Category Prompt and Category LoRA
// becomes a searchable list of the connected bank's categories.
// SPDX-License-Identifier: GPL-3.0-or-later
//
// Clicking the `category` widget opens a list of the bank's names (read from the bank file's header by the
// pack's routes, nodes/bank_routes.py), with preview thumbnails where the bank has them. Typing filters it (any
// part of the name; Latin letters case-insensitively, CJK as typed); arrows + Enter or a click pick, Escape
// closes. Only the visible rows are in the page, so 5,000 names filter as you type. The widget keeps the plain
// name: workflows stay portable and run through the API unchanged. Without a connected bank (or when the bank
// cannot be listed) the widget stays the plain text box it always was.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPES = new Set(["ProductBGCategory", "ProductBGCategoryPrompt", "ProductBGCategoryLora"]);
const BANK_LOADER = "ProductBGLoadCategoryBank";
const ROW = 28;          // px per row without previews
const ROW_PREVIEW = 48;  // px per row when the bank has previews
const VISIBLE = 12;      // rows in view
const MAX_HOPS = 32;

// ------------------------------------------------------------------------------------------ finding the bank
function inputNode(node, name) {
  const index = node.inputs?.findIndex((i) => i.name === name) ?? -1;
  return index < 0 || node.inputs[index].link == null ? null : node.getInputNode(index);
}

// The bank file of a node: its own `bank` input, followed through reroutes (and any pass-through node with one
// input) up to Load Category Bank; for the Category node without a bank, the bank of a node it feeds.
function bankOf(node, seen = new Set()) {
  if (!node || seen.has(node.id)) return null;
  seen.add(node.id);
  let source = inputNode(node, "bank");
  for (let hops = 0; source && hops < MAX_HOPS; hops++) {
    if (source.comfyClass === BANK_LOADER || source.type === BANK_LOADER) {
      const widget = source.widgets?.find((w) => w.name === "bank_name");
      return widget && typeof widget.value === "string" && widget.value ? widget.value : null;
    }
    source = source.inputs?.length === 1 && source.inputs[0].link != null ? source.getInputNode(0) : null;
  }
  for (const output of node.outputs ?? []) {
    for (const linkId of output.links ?? []) {
      const link = node.graph?.links?.get ? node.graph.links.get(linkId) : node.graph?.links?.[linkId];
      const target = link && node.graph.getNodeById(link.target_id);
      const found = target && NODE_TYPES.has(target.comfyClass ?? target.type) && bankOf(target, seen);
      if (found) return found;
    }
  }
  return null;
}

// ------------------------------------------------------------------------------------------ the bank's names
async function listCategories(bank) {
  const response = await api.fetchApi(`/productbg/banks/categories?bank=${encodeURIComponent(bank)}`,
                                       { cache: "no-store" });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  const fold = (s) => s.normalize("NFC").toLocaleLowerCase();
  return { ...body, folded: body.categories.map(fold), fold };
}

function previewUrl(bank, name) {
  return api.apiURL(`/productbg/banks/preview?bank=${encodeURIComponent(bank)}&category=${encodeURIComponent(name)}`);
}

// Indices of the names that hold the query: exact match first, then names that start with it, then the rest,
// each group in bank order.
function filter(list, query) {
  const q = list.fold(query.trim());
  if (!q) return list.categories.map((_, i) => i);
  const exact = [], prefix = [], inside = [];
  list.folded.forEach((name, i) => {
    if (name === q) exact.push(i);
    else if (name.startsWith(q)) prefix.push(i);
    else if (name.includes(q)) inside.push(i);
  });
  return exact.concat(prefix, inside);
}

// ------------------------------------------------------------------------------------------ the list
let open = null;  // the one list on screen: { close() }

function element(tag, style = {}, props = {}) {
  const el = document.createElement(tag);
  Object.assign(el.style, style);
  return Object.assign(el, props);
}

function showPicker({ bank, list, current, x, y, onPick }) {
  open?.close();
  const hasPreviews = list.previews?.some(Boolean);
  const rowHeight = hasPreviews ? ROW_PREVIEW : ROW;
  const panel = element("div", {
    position: "fixed", zIndex: 10000, width: "360px", background: "var(--comfy-menu-bg, #202020)",
    color: "var(--input-text, #ddd)", border: "1px solid var(--border-color, #555)", borderRadius: "6px",
    boxShadow: "0 6px 24px rgba(0,0,0,.5)", font: "13px sans-serif", padding: "6px",
  }, { id: "productbg-category-picker" });
  panel.dataset.bank = bank;
  const title = element("div", { opacity: 0.7, fontSize: "11px", margin: "0 2px 4px" },
                        { textContent: `${bank}: ${list.count} categories` });
  const input = element("input", {
    width: "100%", boxSizing: "border-box", padding: "5px 7px", background: "var(--comfy-input-bg, #111)",
    color: "inherit", border: "1px solid var(--border-color, #555)", borderRadius: "4px", outline: "none",
  }, { type: "search", placeholder: `Filter ${list.count} categories (any part of the name)…`, spellcheck: false,
       className: "productbg-category-filter" });
  const status = element("div", { opacity: 0.7, fontSize: "11px", margin: "4px 2px" });
  status.className = "productbg-category-count";
  const viewport = element("div", { position: "relative", overflowY: "auto", height: `${VISIBLE * rowHeight}px` });
  viewport.className = "productbg-category-rows";
  const spacer = element("div", { position: "relative", width: "100%" });
  viewport.append(spacer);
  panel.append(title, input, status, viewport);
  document.body.append(panel);
  const left = Math.max(4, Math.min(x, window.innerWidth - 370));
  const top = Math.max(4, Math.min(y, window.innerHeight - panel.offsetHeight - 4));
  Object.assign(panel.style, { left: `${left}px`, top: `${top}px` });

  let shown = [], active = 0;
  const rows = new Map();  // index in `shown` -> row element

  function row(k) {
    const i = shown[k], name = list.categories[i];
    const el = element("div", {
      position: "absolute", left: 0, right: 0, top: `${k * rowHeight}px`, height: `${rowHeight}px`,
      display: "flex", alignItems: "center", gap: "8px", padding: "0 6px", cursor: "pointer",
      whiteSpace: "nowrap", overflow: "hidden", textOverflow: "ellipsis", borderRadius: "4px",
    }, { className: "productbg-category-row", title: name });
    el.dataset.name = name;
    if (hasPreviews) {
      const box = element("div", { width: "40px", height: "40px", flex: "0 0 40px", display: "flex",
                                   alignItems: "center", justifyContent: "center" });
      if (list.previews[i]) {
        box.append(element("img", { maxWidth: "40px", maxHeight: "40px", borderRadius: "3px" },
                           { src: previewUrl(bank, name), loading: "lazy", alt: "", className: "productbg-preview" }));
      }
      el.append(box);
    }
    el.append(element("span", { overflow: "hidden", textOverflow: "ellipsis" }, { textContent: name }));
    if (name === current) el.style.fontWeight = "bold";
    el.addEventListener("mousedown", (e) => { e.preventDefault(); pick(k); });
    el.addEventListener("mousemove", () => { if (active !== k) { active = k; paint(); } });
    return el;
  }

  function paint() {  // only the rows in view (plus a few) are in the page
    const first = Math.max(0, Math.floor(viewport.scrollTop / rowHeight) - 3);
    const last = Math.min(shown.length, first + VISIBLE + 6);
    for (const [k, el] of rows) if (k < first || k >= last) { el.remove(); rows.delete(k); }
    for (let k = first; k < last; k++) {
      if (!rows.has(k)) { const el = row(k); rows.set(k, el); spacer.append(el); }
      rows.get(k).style.background = k === active ? "var(--comfy-input-bg, #333)" : "";
    }
  }

  function refilter() {
    shown = filter(list, input.value);
    active = 0;
    for (const el of rows.values()) el.remove();
    rows.clear();
    spacer.style.height = `${shown.length * rowHeight}px`;
    viewport.style.height = `${Math.max(1, Math.min(shown.length, VISIBLE)) * rowHeight}px`;
    viewport.scrollTop = 0;
    status.textContent = !shown.length ? `no category holds "${input.value.trim()}"`
                       : shown.length === list.count ? `${list.count} categories`
                       : `${shown.length} of ${list.count} categories`;
    paint();
  }

  function scrollTo(k) {
    const top = k * rowHeight;
    if (top < viewport.scrollTop) viewport.scrollTop = top;
    else if (top + rowHeight > viewport.scrollTop + viewport.clientHeight) {
      viewport.scrollTop = top + rowHeight - viewport.clientHeight;
    }
  }

  function pick(k) {
    if (k < 0 || k >= shown.length) return;
    const name = list.categories[shown[k]];
    close();
    onPick(name);
  }

  function close() {
    panel.remove();
    document.removeEventListener("mousedown", outside, true);
    if (open?.panel === panel) open = null;
  }

  function outside(e) { if (!panel.contains(e.target)) close(); }

  input.addEventListener("input", refilter);
  input.addEventListener("keydown", (e) => {
    e.stopPropagation();  // keys typed here are not canvas shortcuts
    if (e.key === "ArrowDown" || e.key === "ArrowUp") {
      e.preventDefault();
      active = Math.max(0, Math.min(shown.length - 1, active + (e.key === "ArrowDown" ? 1 : -1)));
      scrollTo(active);
      paint();
    } else if (e.key === "Enter") {
      e.preventDefault();
      pick(active);
    } else if (e.key === "Escape") {
      e.preventDefault();
      close();
    }
  });
  viewport.addEventListener("scroll", paint);
  document.addEventListener("mousedown", outside, true);
  refilter();
  const at = shown.findIndex((i) => list.categories[i] === current);
  if (at > 0) { active = at; scrollTo(at); paint(); }
  input.focus();
  open = { panel, close };
  return open;
}

// ------------------------------------------------------------------------------------------ the widget
function setValue(widget, node, name, e) {
  const canvas = app.canvas;
  if (typeof widget.setValue === "function") widget.setValue(name, { e, node, canvas });
  else { widget.value = name; widget.callback?.(name, canvas, node, undefined, e); }
  node.setDirtyCanvas?.(true, true);
}

async function openFor(node, widget, e) {
  const bank = bankOf(node);
  if (!bank) return false;
  let list;
  try {
    list = await listCategories(bank);
  } catch (err) {
    console.warn(`productbg: cannot list ${bank}: ${err.message}`);
    return false;
  }
  const x = e?.clientX ?? window.innerWidth / 2 - 180, y = e?.clientY ?? window.innerHeight / 3;
  showPicker({ bank, list, current: widget.value, x, y, onPick: (name) => setValue(widget, node, name, e) });
  return true;
}

function attach(node) {
  const widget = node.widgets?.find((w) => w.name === "category");
  if (!widget || widget.productbgList) return;
  widget.productbgList = true;
  const plain = typeof widget.onClick === "function" ? widget.onClick.bind(widget) : null;
  widget.onClick = function (options) {
    const { e } = options ?? {};
    openFor(node, widget, e).then((opened) => { if (!opened) plain?.(options); });
  };
}

app.registerExtension({
  name: "productbg.CategoryList",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODE_TYPES.has(nodeData.name)) return;
    const menu = nodeType.prototype.getExtraMenuOptions;
    nodeType.prototype.getExtraMenuOptions = function (canvas, options) {
      const result = menu?.apply(this, arguments);
      const widget = this.widgets?.find((w) => w.name === "category");
      if (widget && bankOf(this)) {
        options.unshift({ content: "Pick category…", callback: () => openFor(this, widget, null) });
      }
      return result;
    };
  },
  nodeCreated(node) {
    if (NODE_TYPES.has(node.comfyClass)) attach(node);
  },
  loadedGraphNode(node) {
    if (NODE_TYPES.has(node.comfyClass ?? node.type)) attach(node);
  },
  async refreshComboInNodes() {
    open?.close();  // ComfyUI's refresh: the next list is read from the file again
  },
});

// For tests and other extensions: open the list of a node (returns whether it opened).
window.productbgCategoryList = { open: (node, e) => {
  const widget = node.widgets?.find((w) => w.name === "category");
  return widget ? openFor(node, widget, e) : Promise.resolve(false);
}, bankOf };
