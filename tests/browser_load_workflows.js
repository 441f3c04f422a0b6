// The real-browser half of tests/test_comfy_browser.py's pre-V3 check: headless Debian chromium, driven by npm's
// playwright-core, on the real ComfyUI frontend of a running server with this pack.
// SPDX-License-Identifier: GPL-3.0-or-later
//
// Usage: NODE_PATH=<folder holding playwright-core> node tests/browser_load_workflows.js PLAN.json
// PLAN: { url, chromium, workflows: [UI-format JSON paths], widgets: [[node type, widget, value]...] }
// Each workflow is loaded as a person drops it on the canvas; what the frontend made of it is compared with the
// file (unknown node types, widget values it changed on load); then the test's widgets are set (model files,
// sizes) and it is queued as the Run button does. Prints one JSON line: per workflow the node types, the
// unknown ones, the changed widget values, the queue answer and the prompt id.
const fs = require("fs");
const { chromium } = require("playwright-core");

async function main() {
  const plan = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
  const browser = await chromium.launch({
    executablePath: plan.chromium,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
           "--disable-background-networking", "--disable-component-update"],
  });
  const result = { errors: [], workflows: [] };
  try {
    const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
    page.on("pageerror", (e) => result.errors.push(String(e)));
    await page.goto(plan.url, { waitUntil: "networkidle", timeout: 180000 });
    await page.waitForFunction(() => window.app && window.app.graph, null, { timeout: 180000 });
    await page.keyboard.press("Escape");
    for (const path of plan.workflows) {
      const workflow = JSON.parse(fs.readFileSync(path, "utf8"));
      const seen = await page.evaluate(async ({ workflow, widgets }) => {
        const app = window.app;
        await app.loadGraphData(workflow);
        const known = (type) => window.LiteGraph ? !!window.LiteGraph.registered_node_types[type] : true;
        const nodes = app.graph._nodes;
        const unknown = nodes.filter((n) => !known(n.type) || (n.type.startsWith("ProductBG") && n.comfyClass !== n.type))
          .map((n) => n.type);
        const saved = Object.fromEntries(workflow.nodes.map((n) => [n.id, JSON.stringify(n.widgets_values ?? [])]));
        const changed = app.graph.serialize().nodes
          .filter((n) => JSON.stringify(n.widgets_values ?? []) !== saved[n.id])
          .map((n) => ({ id: n.id, type: n.type, file: saved[n.id], loaded: JSON.stringify(n.widgets_values ?? []) }));
        for (const [type, name, value] of widgets)
          for (const node of nodes.filter((n) => n.type === type)) {
            const w = node.widgets?.find((w) => w.name === name);
            if (w) w.value = value;
          }
        return { types: nodes.map((n) => n.type), unknown, changed };
      }, { workflow, widgets: plan.widgets });
      const answer = page.waitForResponse((r) => r.url().endsWith("/prompt") && r.request().method() === "POST",
                                          { timeout: 120000 });
      await page.evaluate(() => window.app.queuePrompt(0, 1));
      const response = await answer;
      const body = await response.json();
      result.workflows.push({ path, ...seen, queue_status: response.status(), prompt_id: body.prompt_id ?? null,
                              queue_error: response.status() === 200 ? null : JSON.stringify(body).slice(0, 4000) });
    }
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(result));
}

main().catch((e) => { console.error(e); process.exit(1); });
