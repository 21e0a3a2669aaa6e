/* rfreport's page script: collapsible sections and the RF explorer. Inline, no dependencies. */
(function () {
  "use strict";

  function openSection(id) {
    var target = id && document.getElementById(id);
    var details = target && (target.querySelector("details") || target.closest("details"));
    if (details) { details.open = true; }
  }
  function openFromHash() { openSection(decodeURIComponent(location.hash.slice(1))); }
  window.addEventListener("hashchange", openFromHash);
  openFromHash();
  document.addEventListener("click", function (event) {
    var link = event.target.closest && event.target.closest('a[href^="#"]');
    if (link) { openSection(decodeURIComponent(link.getAttribute("href").slice(1))); }
    var button = event.target.closest && event.target.closest("button[data-details]");
    if (button) {
      document.querySelectorAll("section.model > details").forEach(function (d) {
        d.open = button.getAttribute("data-details") === "open";
      });
    }
  });
  var closedForPrint = [];
  window.addEventListener("beforeprint", function () {
    closedForPrint = Array.prototype.filter.call(document.querySelectorAll("details"), function (d) { return !d.open; });
    closedForPrint.forEach(function (d) { d.open = true; });
  });
  window.addEventListener("afterprint", function () { closedForPrint.forEach(function (d) { d.open = false; }); });

  var FLAG_TEXT = {edge: "sees padding", h_clip_lo: "clipped at the top", h_clip_hi: "clipped at the bottom",
    w_clip_lo: "clipped at the left", w_clip_hi: "clipped at the right", h_wrap: "wraps on h", w_wrap: "wraps on w"};

  function explorer(section, data) {
    var panel = section.querySelector('[data-explorer="input"]');
    var info = section.querySelector("output.rf-info");
    var toggle = section.querySelector("input.rf-erf-toggle");
    var grids = Array.prototype.slice.call(section.querySelectorAll('.grid-output .panel[tabindex]'));
    if (!panel || !info || !grids.length) { return; }
    var box = panel.querySelector("rect.rf-box"), layer = panel.querySelector("image.rf-layer");
    var rows = data.grid[0], cols = data.grid[1], index = {};
    data.cell.forEach(function (cell, i) { index[cell] = i; });
    var erfImages = {};
    section.querySelectorAll("figure.heatmap[data-position] img").forEach(function (img) {
      erfImages[img.closest("figure").getAttribute("data-position")] = img.getAttribute("src");
    });
    var pinned = null, cursor = Math.floor(rows / 2) * cols + Math.floor(cols / 2);

    function flagsOf(i) {
      return data.flagNames.filter(function (name, bit) { return (data.flags[i] >> bit) & 1; });
    }
    function show(cell) {
      grids.forEach(function (grid) {
        var mark = grid.querySelector("rect.cursor");
        if (cell === null) { mark.setAttribute("visibility", "hidden"); return; }
        mark.setAttribute("x", cell % cols); mark.setAttribute("y", Math.floor(cell / cols));
        mark.setAttribute("visibility", "visible");
      });
      var i = cell === null ? undefined : index[cell];
      if (i === undefined) {
        box.setAttribute("visibility", "hidden"); layer.setAttribute("visibility", "hidden");
        box.removeAttribute("data-pos");
        info.textContent = cell === null ? "Point at an output cell to see its receptive field." :
          "Output (" + data.coords[0][Math.floor(cell / cols)] + ", " + data.coords[1][cell % cols] + ") was not swept.";
        return;
      }
      var pos = [data.pos_h[i], data.pos_w[i]], lo = [data.h_lo[i], data.w_lo[i]], hi = [data.h_hi[i], data.w_hi[i]];
      var size = [hi[0] - lo[0] + 1, hi[1] - lo[1] + 1], key = pos.join(",");
      var empty = size[0] <= 0 || size[1] <= 0;
      box.setAttribute("x", lo[1]); box.setAttribute("y", lo[0]);
      box.setAttribute("width", Math.max(size[1], 0)); box.setAttribute("height", Math.max(size[0], 0));
      box.setAttribute("data-pos", key); box.setAttribute("data-lo", lo.join(",")); box.setAttribute("data-hi", hi.join(","));
      box.setAttribute("visibility", empty ? "hidden" : "visible");
      var useErf = toggle && toggle.checked && erfImages[key];
      var src = useErf ? erfImages[key] : data.masks[key];
      if (src) { layer.setAttribute("href", src); layer.setAttribute("visibility", "visible"); }
      else { layer.setAttribute("visibility", "hidden"); }
      var flags = flagsOf(i).map(function (f) { return FLAG_TEXT[f] || f; });
      var text = "Output (" + pos.join(", ") + (pinned === cell ? ", pinned" : "") + "): " +
        (empty ? "sees no input pixel" :
          "RF rows " + lo[0] + "–" + hi[0] + ", columns " + lo[1] + "–" + hi[1] + " (inclusive) · size " +
          size[0] + " × " + size[1] + " · support " + data.support[i] + " pixels, fill " + data.fill[i].toFixed(3)) +
        " · " + (flags.length ? flags.join(", ") : "clear of the border") +
        (data.masks[key] ? " · support mask shown" : "");
      var erf = data.erf[key];
      if (erf) {
        text += " · ERF: 95% of its mass on " + (100 * erf.area95_ratio).toFixed(1) + "% of the RF, peak at (" +
          erf.peak.join(", ") + "), centre of mass offset " + erf.offset.join(", ") + (useErf ? " (ERF map shown)" : "");
      }
      info.textContent = text;
    }
    function cellAt(grid, event) {
      var rect = grid.getBoundingClientRect();
      var c = Math.floor((event.clientX - rect.left) / rect.width * cols);
      var r = Math.floor((event.clientY - rect.top) / rect.height * rows);
      if (r < 0 || c < 0 || r >= rows || c >= cols) { return null; }
      return r * cols + c;
    }
    grids.forEach(function (grid) {
      grid.addEventListener("mousemove", function (event) { var cell = cellAt(grid, event); if (cell !== null) { show(cell); } });
      grid.addEventListener("mouseleave", function () { show(pinned); });
      grid.addEventListener("click", function (event) {
        var cell = cellAt(grid, event);
        if (cell !== null) { pinned = cell; cursor = cell; show(cell); }
      });
      grid.addEventListener("focus", function () { show(pinned !== null ? pinned : cursor); });
      grid.addEventListener("blur", function () { show(pinned); });
      grid.addEventListener("keydown", function (event) {
        var r = Math.floor(cursor / cols), c = cursor % cols;
        var moves = {ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1]};
        if (moves[event.key]) {
          r = Math.min(rows - 1, Math.max(0, r + moves[event.key][0]));
          c = Math.min(cols - 1, Math.max(0, c + moves[event.key][1]));
          cursor = r * cols + c;
          show(cursor);
          event.preventDefault();
        } else if (event.key === "Enter" || event.key === " ") {
          pinned = cursor; show(cursor); event.preventDefault();
        } else if (event.key === "Escape") {
          pinned = null; show(cursor);
        }
      });
    });
    if (toggle) { toggle.addEventListener("change", function () { show(pinned); }); }
  }

  document.querySelectorAll("script.rf-data").forEach(function (node) {
    explorer(node.closest("section"), JSON.parse(node.textContent));
  });
}());
