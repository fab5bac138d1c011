// The revenue page's MRR chart: ending MRR (line) with what each month gained (new,
// expansion, reactivation) and lost (contraction, churn) as bars, one chart per
// currency. Data comes from the page's <script type="application/json">; the tables
// beside the charts carry every number without JavaScript.
(function () {
  "use strict";
  var source = document.getElementById("revenue-chart-data");
  if (!source || typeof uPlot === "undefined") return;
  var currencies = JSON.parse(source.textContent);

  function seconds(month) {
    var parts = month.split("-");
    return Date.UTC(Number(parts[0]), Number(parts[1]) - 1, 1) / 1000;
  }

  function draw(block) {
    var target = document.getElementById("chart-" + block.currency);
    if (!target) return;
    var bars = uPlot.paths.bars({ size: [0.6, 40] });
    var data = [
      block.months.map(seconds),
      block.ending.map(Number),
      block.gained.map(Number),
      block.lost.map(Number),
    ];
    var width = Math.max(target.clientWidth || 0, 320);
    var options = {
      width: width,
      height: 260,
      title: "MRR (" + block.currency + ")",
      scales: { x: { time: true } },
      axes: [{}, { size: 70 }],
      series: [
        {},
        { label: "Ending MRR", stroke: "#1f4e79", width: 2 },
        { label: "Gained", stroke: "#2da44e", fill: "rgba(45,164,78,0.35)", paths: bars },
        { label: "Lost", stroke: "#cf222e", fill: "rgba(207,34,46,0.35)", paths: bars },
      ],
    };
    var chart = new uPlot(options, data, target);
    target.dataset.drawn = "true";
    window.addEventListener("resize", function () {
      chart.setSize({ width: Math.max(target.clientWidth, 320), height: 260 });
    });
  }

  currencies.forEach(draw);
})();
