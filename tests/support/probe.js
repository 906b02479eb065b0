// Runs in JupyterLab's page after the notebook ran: what a reader sees, measured from the live
// DOM and its layout. Returns JSON-able data; tests/kernel/test_browser.py makes the assertions.
() => {
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = 1;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  // Any CSS colour (rgb(), color(srgb ...), color-mix() results) as [r, g, b, alpha].
  function rgba(css) {
    ctx.clearRect(0, 0, 1, 1);
    ctx.fillStyle = "rgba(0, 0, 0, 0)";
    ctx.fillStyle = css;
    ctx.fillRect(0, 0, 1, 1);
    const d = ctx.getImageData(0, 0, 1, 1).data;
    return [d[0], d[1], d[2], d[3] / 255];
  }
  function over(top, bottom) {
    const a = top[3];
    return [0, 1, 2].map((i) => a * top[i] + (1 - a) * bottom[i]).concat([1]);
  }
  // The opaque colour behind an element: its own and its ancestors' backgrounds, composited.
  function background(el) {
    const layers = [];
    for (let node = el; node && node.nodeType === 1; node = node.parentElement) {
      const colour = rgba(getComputedStyle(node).backgroundColor);
      if (colour[3] > 0) layers.push(colour);
      if (colour[3] >= 1) break;
    }
    let result = [255, 255, 255, 1];
    for (let i = layers.length - 1; i >= 0; i--) result = over(layers[i], result);
    return result.slice(0, 3);
  }
  function opacity(el) {
    let value = 1;
    for (let node = el; node && node.nodeType === 1; node = node.parentElement) value *= Number(getComputedStyle(node).opacity);
    return value;
  }
  function ownText(el) {
    return Array.from(el.childNodes).filter((n) => n.nodeType === 3).map((n) => n.textContent).join("").trim();
  }
  function cell(td) {
    return { text: td.innerText.trim(), align: getComputedStyle(td).textAlign, tag: td.tagName.toLowerCase() };
  }
  function table(t) {
    const caption = t.querySelector("caption");
    return {
      caption: caption ? caption.innerText.trim() : null,
      headers: Array.from(t.querySelectorAll("thead th")).map(cell),
      rows: Array.from(t.querySelectorAll("tbody tr")).map((tr) => Array.from(tr.children).map(cell)),
    };
  }
  function report(root) {
    const rect = root.getBoundingClientRect();
    const area = root.closest(".jp-OutputArea-output") || root.parentElement;
    const areaRect = area.getBoundingClientRect();
    const overflowing = Array.from(root.querySelectorAll("*"))
      .filter((el) => el.getBoundingClientRect().right > areaRect.right + 1)
      .map((el) => `${el.tagName.toLowerCase()} "${el.innerText.slice(0, 40)}" ends at ${Math.round(el.getBoundingClientRect().right)} px, the output at ${Math.round(areaRect.right)} px`);
    const colours = {};
    for (const el of [root, ...root.querySelectorAll("*")]) {
      const text = ownText(el);
      if (!text || el.closest("style")) continue;
      const style = getComputedStyle(el);
      const sample = {
        sample: text.slice(0, 50), color: rgba(style.color), background: background(el), opacity: opacity(el),
        fontSize: parseFloat(style.fontSize), fontWeight: Number(style.fontWeight),
      };
      colours[JSON.stringify([sample.color, sample.background, sample.opacity])] = sample;
    }
    return {
      text: root.innerText,
      visible: root.checkVisibility({ checkOpacity: true, checkVisibilityCSS: true }),
      width: rect.width, height: rect.height, fontSize: parseFloat(getComputedStyle(root).fontSize),
      scrollWidth: root.scrollWidth, clientWidth: root.clientWidth,
      areaScrollWidth: area.scrollWidth, areaClientWidth: area.clientWidth,
      overflowing: overflowing,
      tables: Array.from(root.querySelectorAll("table")).map(table),
      preCount: root.querySelectorAll("pre").length,
      warningBlocks: Array.from(root.querySelectorAll(".lm-panel-warn")).map((el) => el.innerText.trim()),
      colours: Object.values(colours),
    };
  }
  const cells = Array.from(document.querySelectorAll(".jp-Notebook .jp-CodeCell")).map((c) => ({
    source: (c.querySelector(".cm-content") || c).innerText,
    prompt: (c.querySelector(".jp-InputPrompt") || {}).innerText,
    reports: Array.from(c.querySelectorAll(".jp-OutputArea .llm-magic")).map(report),
    outputText: (c.querySelector(".jp-OutputArea") || { innerText: "" }).innerText,
  }));
  const notebook = document.querySelector(".jp-Notebook");
  return {
    theme: document.body.dataset.jpThemeName,
    themeLight: document.body.dataset.jpThemeLight,
    viewport: window.innerWidth,
    cells: cells,
    pageText: notebook.innerText,
    notebookHeight: notebook.scrollHeight,
  };
}
