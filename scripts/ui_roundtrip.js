// Convert an API-format workflow into the UI format with ComfyUI's own web frontend, and take a thumbnail.
// Usage: NODE_PATH=<folder holding node_modules/playwright-core> node scripts/ui_roundtrip.js \
//            http://127.0.0.1:8188 workflows/api/x.json workflows/x.json workflows/x.png
// Needs Debian's chromium (/usr/bin/chromium) and npm's playwright-core; a ComfyUI server with this pack.
const fs = require("fs");
const { chromium } = require("playwright-core");

async function main() {
  const [url, apiFile, uiFile, pngFile] = process.argv.slice(2);
  const prompt = JSON.parse(fs.readFileSync(apiFile, "utf8"));
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
           "--disable-background-networking", "--disable-component-update"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 2400, height: 1300 } });
    await page.goto(url, { waitUntil: "networkidle", timeout: 120000 });
    await page.waitForFunction(() => window.app && window.app.graph, null, { timeout: 120000 });
    await page.keyboard.press("Escape");
    await page.addStyleTag({ content: ".p-toast, .p-message, .p-dialog-mask, .p-dialog, [class*='banner'], [class*='Banner'] { display: none !important; }" });
    const workflow = await page.evaluate(async (p) => {
      await window.app.loadApiJson(p, "workflow.json");
      const graph = window.app.graph, canvas = window.app.canvas;
      graph.arrange(40);  // layered left-to-right layout
      for (const n of graph._nodes)  // shipped workflows reproduce: seeds stay fixed
        for (const w of n.widgets || []) if (w.name === "control_after_generate") w.value = "fixed";
      let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
      for (const n of graph._nodes) {
        x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 30);
        x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
      }
      const el = canvas.canvas, scale = Math.min(el.width / (x1 - x0 + 80), el.height / (y1 - y0 + 80), 1);
      try {  // draw widgets and titles even when zoomed out (no level-of-detail shortcut)
        await window.app.extensionManager.setting.set("LiteGraph.Canvas.MinFontSizeForLOD", 0);
      } catch (e) { canvas.low_quality_zoom_threshold = 0.05; }
      canvas.ds.scale = scale;
      canvas.ds.offset = [-x0 + 40, -y0 + 40];
      canvas.setDirty(true, true);
      return (await window.app.graphToPrompt()).workflow;
    }, prompt);
    const tmp = uiFile + ".tmp";
    fs.writeFileSync(tmp, JSON.stringify(workflow, null, 1) + "\n");
    fs.renameSync(tmp, uiFile);
    await page.waitForTimeout(1500);
    // The canvas' own pixels: no menus, dialogs or minimap over the graph.
    const dataUrl = await page.evaluate(() => {
      window.app.canvas.draw(true, true);
      return window.app.canvas.canvas.toDataURL("image/png");
    });
    fs.writeFileSync(pngFile, Buffer.from(dataUrl.split(",")[1], "base64"));
    console.log(`${uiFile}: ${workflow.nodes.length} nodes, ${workflow.links.length} links`);
  } finally {
    await browser.close();
  }
}

main().catch((e) => { console.error(e); process.exit(1); });
