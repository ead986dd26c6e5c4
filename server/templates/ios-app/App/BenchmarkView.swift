// Benchmark screen: times the workload `atelier bench --case coreml-e2e` times on a desktop
// (one image at the export's size, fixed prompt and seed, DPM-Solver++ with Karras spacing,
// guidance 7.5, one untimed warm-up run) and appends one JSON line per timed run, in the
// shape `atelier bench compare` reads ("schema": "atelier-bench-v1"), to
// Documents/atelier-bench.jsonl, which the Share button sends off the device.

import CoreML
import Darwin
import Foundation
import StableDiffusion
import SwiftUI

/// One benchmark result line ("atelier-bench-v1"; the desktop writes the same fields).
struct BenchRecord: Codable {
    var schema = "atelier-bench-v1"
    var `case` = "coreml-e2e"
    var device: String
    var os: String
    var engine = "coreml"
    /// MLComputeUnits as Swift names it: cpuOnly, cpuAndGPU, cpuAndNeuralEngine or all.
    var compute_units: String
    var model: String
    var style: String
    var width: Int
    var height: Int
    var steps: Int
    /// Median interval between consecutive step callbacks, in seconds.
    var seconds_per_step: Double
    /// Wall time of the whole generation (text encoding, steps, decoding), in seconds.
    var seconds_per_image: Double
    /// Peak physical footprint of the app so far, in bytes.
    var peak_memory_bytes: Int64
    /// Sum of the exported packages' sizes (atelier_export.json), in bytes.
    var package_bytes: Int64
    /// UTC, RFC 3339.
    var date: String
    var atelier_version: String
}

enum Benchmark {
    /// The fixed workload, the same as the desktop case.
    static let prompt = {{BENCH_PROMPT_LITERAL}}
    static let seed: UInt32 = {{BENCH_SEED}}
    static let guidance: Float = {{BENCH_GUIDANCE}}
    static let fileName = "atelier-bench.jsonl"

    static var fileURL: URL { ImageFiles.documents().appendingPathComponent(fileName) }

    struct ComputeUnitChoice: Identifiable {
        /// The name MLComputeUnits gives the case, as written in the results.
        let name: String
        let units: MLComputeUnits
        var id: String { name }
    }

    static let computeUnitChoices: [ComputeUnitChoice] = [
        ComputeUnitChoice(name: "cpuAndNeuralEngine", units: .cpuAndNeuralEngine),
        ComputeUnitChoice(name: "cpuAndGPU", units: .cpuAndGPU),
        ComputeUnitChoice(name: "all", units: .all),
        ComputeUnitChoice(name: "cpuOnly", units: .cpuOnly),
    ]

    /// Median of the intervals between consecutive step callbacks; with one step, the time
    /// from the call to that step (as the desktop computes it).
    static func secondsPerStep(start: Double, stepTimes: [Double]) -> Double {
        guard stepTimes.count > 1 else { return (stepTimes.first ?? start) - start }
        let intervals = zip(stepTimes.dropFirst(), stepTimes).map { $0 - $1 }.sorted()
        return intervals[intervals.count / 2]
    }

    /// Appends lines to the results file.
    static func append(_ records: [BenchRecord]) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        var text = ""
        for record in records {
            text += String(decoding: try encoder.encode(record), as: UTF8.self) + "\n"
        }
        let url = fileURL
        if let handle = try? FileHandle(forWritingTo: url) {
            defer { try? handle.close() }
            try handle.seekToEnd()
            try handle.write(contentsOf: Data(text.utf8))
        } else {
            try Data(text.utf8).write(to: url, options: .atomic)
        }
    }
}

/// What the device is called and how much memory the app has used.
enum DeviceInfo {
    static func sysctlString(_ name: String) -> String? {
        var size = 0
        guard sysctlbyname(name, nil, &size, nil, 0) == 0, size > 0 else { return nil }
        var buffer = [CChar](repeating: 0, count: size)
        guard sysctlbyname(name, &buffer, &size, nil, 0) == 0 else { return nil }
        return String(cString: buffer)
    }

    /// The chip on a Mac ("Apple M2 Pro"), the model identifier on iPhone and iPad ("iPhone15,2").
    static var device: String {
        if ProcessInfo.processInfo.isiOSAppOnMac || ProcessInfo.processInfo.isMacCatalystApp {
            if let brand = sysctlString("machdep.cpu.brand_string") { return brand }
        }
        return sysctlString("hw.machine") ?? ProcessInfo.processInfo.hostName
    }

    static var os: String {
        let v = ProcessInfo.processInfo.operatingSystemVersion
        #if os(macOS)
        let name = "macOS"
        #else
        let name = ProcessInfo.processInfo.isiOSAppOnMac ? "macOS" : "iOS"
        #endif
        return "\(name) \(v.majorVersion).\(v.minorVersion).\(v.patchVersion)"
    }

    /// Peak physical footprint of this process (what Xcode's memory gauge shows), in bytes.
    static func peakMemoryBytes() -> Int64 {
        var info = task_vm_info_data_t()
        var count = mach_msg_type_number_t(MemoryLayout<task_vm_info_data_t>.size / MemoryLayout<integer_t>.size)
        let result = withUnsafeMutablePointer(to: &info) { pointer in
            pointer.withMemoryRebound(to: integer_t.self, capacity: Int(count)) { raw in
                task_info(mach_task_self_, task_flavor_t(TASK_VM_INFO), raw, &count)
            }
        }
        if result == KERN_SUCCESS {
            return Int64(info.ledger_phys_footprint_peak)
        }
        var usage = rusage()
        getrusage(RUSAGE_SELF, &usage)
        return Int64(usage.ru_maxrss)  // bytes on Darwin
    }
}

@MainActor
final class BenchmarkModel: ObservableObject {
    @Published var runs = 3
    @Published var steps = 20
    @Published var computeUnits = "cpuAndNeuralEngine"
    @Published private(set) var status = ""
    @Published private(set) var running = false
    @Published private(set) var lines: [String] = []
    @Published var error: String?

    func loadExisting() {
        let text = (try? String(contentsOf: Benchmark.fileURL, encoding: .utf8)) ?? ""
        lines = text.split(separator: "\n").map(String.init)
    }

    func start(store: ModelStore, styleName: String) {
        guard !running, let manifest = store.manifest else { return }
        let style = manifest.styles.first { $0.name == styleName } ?? manifest.styles.first
        let units = Benchmark.computeUnitChoices.first { $0.name == computeUnits } ?? Benchmark.computeUnitChoices[0]
        var config = StableDiffusionPipeline.Configuration(prompt: Benchmark.prompt)
        config.stepCount = steps
        config.guidanceScale = Benchmark.guidance
        config.seed = Benchmark.seed
        config.schedulerType = .dpmSolverMultistepScheduler
        config.schedulerTimestepSpacing = .karras
        config.disableSafety = true
        if let scale = manifest.settings.latent_scaling_factor {
            config.decoderScaleFactor = Float(scale)
            config.encoderScaleFactor = Float(scale)
        }
        let configuration = config  // a constant: the pipeline queue reads it
        let runs = max(self.runs, 1)
        let steps = self.steps
        running = true
        error = nil
        status = "Loading models and warming up…"
        Task {
            do {
                var records: [BenchRecord] = []
                for run in 0...runs {
                    if run > 0 {
                        status = "Run \(run) of \(runs)…"
                    }
                    let timing = try await PipelineRunner.shared.run(
                        folder: store.compiledFolder,
                        style: style,
                        multifunction: manifest.multifunction,
                        computeUnits: units.units
                    ) { pipeline -> (Double, Double) in
                        var stepTimes: [Double] = []
                        let start = ProcessInfo.processInfo.systemUptime
                        _ = try pipeline.generateImages(configuration: configuration) { _ in
                            stepTimes.append(ProcessInfo.processInfo.systemUptime)
                            return true
                        }
                        let end = ProcessInfo.processInfo.systemUptime
                        return (Benchmark.secondsPerStep(start: start, stepTimes: stepTimes), end - start)
                    }
                    if run == 0 { continue }  // the warm-up loads and specialises the models
                    records.append(BenchRecord(
                        device: DeviceInfo.device,
                        os: DeviceInfo.os,
                        compute_units: units.name,
                        model: manifest.base_model.name,
                        style: style?.name ?? "",
                        width: manifest.settings.width,
                        height: manifest.settings.height,
                        steps: steps,
                        seconds_per_step: timing.0,
                        seconds_per_image: timing.1,
                        peak_memory_bytes: DeviceInfo.peakMemoryBytes(),
                        package_bytes: manifest.packageBytes,
                        date: ISO8601DateFormatter().string(from: Date()),
                        atelier_version: manifest.atelier_version ?? GeneratedExport.atelierVersion
                    ))
                }
                try Benchmark.append(records)
                loadExisting()
                let perImage = records.map(\.seconds_per_image).sorted()
                status = String(format: "Median %.2f s per image over %ld runs.", perImage[perImage.count / 2], perImage.count)
            } catch {
                self.error = error.localizedDescription
                status = ""
            }
            running = false
        }
    }
}

struct BenchmarkView: View {
    @EnvironmentObject private var store: ModelStore
    @StateObject private var model = BenchmarkModel()
    @State private var styleName = ""

    var body: some View {
        NavigationStack {
            Form {
                Section("Workload") {
                    Text("“\(Benchmark.prompt)”, \(store.manifest?.settings.width ?? GeneratedExport.width)×\(store.manifest?.settings.height ?? GeneratedExport.height), guidance \(String(format: "%.1f", Benchmark.guidance)), seed \(String(Benchmark.seed)); the same as `atelier bench --case coreml-e2e`.")
                        .font(.footnote)
                    Picker("Style", selection: $styleName) {
                        ForEach(store.styles) { style in
                            Text(style.name).tag(style.name)
                        }
                    }
                    Stepper("Steps: \(model.steps)", value: $model.steps, in: 1...100)
                    Stepper("Timed runs: \(model.runs)", value: $model.runs, in: 1...20)
                    Picker("Compute units", selection: $model.computeUnits) {
                        ForEach(Benchmark.computeUnitChoices) { choice in
                            Text(choice.name).tag(choice.name)
                        }
                    }
                }
                Section {
                    Button(model.running ? "Running…" : "Run benchmark") {
                        model.start(store: store, styleName: styleName)
                    }
                    .disabled(model.running)
                    if !model.status.isEmpty {
                        Text(model.status)
                    }
                    if let error = model.error {
                        Text(error).foregroundStyle(.red)
                    }
                }
                Section("Results (\(Benchmark.fileName))") {
                    ForEach(Array(model.lines.enumerated()), id: \.offset) { _, line in
                        Text(line).font(.caption.monospaced()).lineLimit(3)
                    }
                    if !model.lines.isEmpty {
                        ShareLink(item: Benchmark.fileURL) {
                            Label("Share results", systemImage: "square.and.arrow.up")
                        }
                    }
                }
            }
            .navigationTitle("Benchmark")
            .onAppear {
                model.loadExisting()
                if styleName.isEmpty {
                    styleName = store.defaultStyle
                }
            }
        }
    }
}
