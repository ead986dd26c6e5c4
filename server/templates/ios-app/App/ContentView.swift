// Generate screen: prompt, negative prompt, steps, guidance, seed and the exported styles;
// step progress while the pipeline runs; the image with save/share.

import CoreML
import ImageIO
import StableDiffusion
import SwiftUI
import UniformTypeIdentifiers

struct ContentView: View {
    @EnvironmentObject private var store: ModelStore

    var body: some View {
        Group {
            if store.state == .ready {
                TabView {
                    GenerateView()
                        .tabItem { Label("Generate", systemImage: "paintbrush") }
                    BenchmarkView()
                        .tabItem { Label("Benchmark", systemImage: "stopwatch") }
                }
            } else {
                ModelSetupView()
            }
        }
    }
}

/// Shown until the models are compiled: progress, the import button, or what went wrong.
struct ModelSetupView: View {
    @EnvironmentObject private var store: ModelStore
    @State private var importing = false

    var body: some View {
        VStack(spacing: 16) {
            Text(GeneratedExport.appName).font(.largeTitle.bold())
            switch store.state {
            case .preparing(let what):
                ProgressView()
                Text(what).foregroundStyle(.secondary)
                Text("The first launch compiles the models for this device; later launches start at once.")
                    .font(.footnote).foregroundStyle(.secondary).multilineTextAlignment(.center)
            case .needsImport:
                Text("Pick the folder `atelier export coreml` wrote (copy it to iCloud Drive or On My iPhone first).")
                    .multilineTextAlignment(.center)
                Button("Import models…") { importing = true }.buttonStyle(.borderedProminent)
            case .failed(let message):
                Label(message, systemImage: "exclamationmark.triangle").foregroundStyle(.red)
                if GeneratedExport.modelSource == .imported {
                    Button("Import another folder…") { importing = true }
                }
            case .ready:
                EmptyView()
            }
        }
        .padding()
        .fileImporter(isPresented: $importing, allowedContentTypes: [.folder]) { result in
            if case .success(let url) = result {
                Task { await store.importFolder(url) }
            }
        }
    }
}

@MainActor
final class Generator: ObservableObject {
    @Published var prompt = ""
    @Published var negativePrompt = ""
    @Published var steps = 20
    @Published var guidance = 7.5
    @Published var seedText = ""
    @Published var styleName = ""
    @Published private(set) var step = 0
    @Published private(set) var stepCount = 0
    @Published private(set) var running = false
    @Published private(set) var image: CGImage?
    @Published private(set) var imageURL: URL?
    @Published private(set) var usedSeed: UInt32 = 0
    @Published var error: String?

    private let cancel = CancelFlag()

    func generate(store: ModelStore) {
        guard !running else { return }
        let style = store.styles.first { $0.name == styleName } ?? store.styles.first
        let seed = UInt32(seedText.trimmingCharacters(in: .whitespaces)) ?? UInt32.random(in: 0...UInt32.max)
        var config = StableDiffusionPipeline.Configuration(prompt: prompt)
        config.negativePrompt = negativePrompt
        config.stepCount = steps
        config.guidanceScale = Float(guidance)
        config.seed = seed
        config.schedulerType = .dpmSolverMultistepScheduler
        config.schedulerTimestepSpacing = .karras
        config.disableSafety = true
        if let scale = store.manifest?.settings.latent_scaling_factor {
            config.decoderScaleFactor = Float(scale)
            config.encoderScaleFactor = Float(scale)
        }
        let configuration = config  // a constant: the pipeline queue reads it
        running = true
        error = nil
        step = 0
        stepCount = steps
        usedSeed = seed
        cancel.set(false)
        let cancel = self.cancel
        Task {
            do {
                let images = try await PipelineRunner.shared.run(
                    folder: store.compiledFolder,
                    style: style,
                    multifunction: store.multifunction,
                    computeUnits: .cpuAndNeuralEngine
                ) { pipeline in
                    try pipeline.generateImages(configuration: configuration) { progress in
                        let done = progress.step + 1
                        let total = progress.stepCount
                        Task { @MainActor in
                            self.step = done
                            self.stepCount = total
                        }
                        return !cancel.isSet
                    }
                }
                if let first = images.first, let cgImage = first {
                    image = cgImage
                    imageURL = try ImageFiles.savePNG(cgImage, name: "atelier-\(seed).png")
                } else if !cancel.isSet {
                    error = "The pipeline returned no image."
                }
            } catch {
                self.error = error.localizedDescription
            }
            running = false
        }
    }

    func stop() {
        cancel.set(true)
    }
}

struct GenerateView: View {
    @EnvironmentObject private var store: ModelStore
    @StateObject private var generator = Generator()

    var body: some View {
        NavigationStack {
            Form {
                Section("Prompt") {
                    TextField("What to paint", text: $generator.prompt, axis: .vertical)
                    TextField("Negative prompt", text: $generator.negativePrompt, axis: .vertical)
                }
                Section("Style") {
                    Picker("Style", selection: $generator.styleName) {
                        ForEach(store.styles) { style in
                            Text(style.name).tag(style.name)
                        }
                    }
                    if let style = store.styles.first(where: { $0.name == generator.styleName }) {
                        Text(style.summary).font(.footnote).foregroundStyle(.secondary)
                    }
                }
                Section("Settings") {
                    Stepper("Steps: \(generator.steps)", value: $generator.steps, in: 1...100)
                    VStack(alignment: .leading) {
                        Text("Guidance scale: \(generator.guidance, specifier: "%.1f")")
                        Slider(value: $generator.guidance, in: 0...20, step: 0.5)
                    }
                    TextField("Seed (random when empty)", text: $generator.seedText)
                        .keyboardType(.numberPad)
                }
                Section {
                    if generator.running {
                        ProgressView(value: Double(generator.step), total: Double(max(generator.stepCount, 1))) {
                            Text("Step \(generator.step) of \(generator.stepCount)")
                        }
                        Button("Stop", role: .cancel) { generator.stop() }
                    } else {
                        Button("Generate") { generator.generate(store: store) }
                            .disabled(generator.prompt.trimmingCharacters(in: .whitespaces).isEmpty)
                    }
                    if let error = generator.error {
                        Text(error).foregroundStyle(.red)
                    }
                }
                if let image = generator.image {
                    Section("Seed \(String(generator.usedSeed))") {
                        Image(decorative: image, scale: 1)
                            .resizable()
                            .interpolation(.none)
                            .scaledToFit()
                        if let url = generator.imageURL {
                            ShareLink(item: url) {
                                Label("Save or share", systemImage: "square.and.arrow.up")
                            }
                        }
                    }
                }
            }
            .navigationTitle(GeneratedExport.appName)
            .onAppear {
                if generator.styleName.isEmpty {
                    generator.styleName = store.defaultStyle
                }
            }
        }
    }
}

/// PNG files in the app's Documents folder.
enum ImageFiles {
    static func documents() -> URL {
        FileManager.default.urls(for: .documentDirectory, in: .userDomainMask).first ?? FileManager.default.temporaryDirectory
    }

    static func savePNG(_ image: CGImage, name: String) throws -> URL {
        let url = documents().appendingPathComponent(name)
        guard let destination = CGImageDestinationCreateWithURL(url as CFURL, UTType.png.identifier as CFString, 1, nil) else {
            throw AppError("Cannot write \(name).")
        }
        CGImageDestinationAddImage(destination, image, nil)
        guard CGImageDestinationFinalize(destination) else {
            throw AppError("Cannot write \(name).")
        }
        return url
    }
}
