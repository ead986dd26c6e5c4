// Finds the exported models (bundled in the app or imported through the Files app),
// compiles each `.mlpackage` to `.mlmodelc` once with `MLModel.compileModel(at:)` into
// Application Support, and keeps the tokenizer files and manifest beside them: the folder
// layout `StableDiffusionPipeline(resourcesAt:)` loads (TextEncoder.mlmodelc, Unet.mlmodelc or
// UnetChunk1.mlmodelc + UnetChunk2.mlmodelc, VAEDecoder.mlmodelc, VAEEncoder.mlmodelc,
// vocab.json, merges.txt).

import CoreML
import Foundation
import StableDiffusion

@MainActor
final class ModelStore: ObservableObject {
    enum State: Equatable {
        /// `--import` apps before the first import.
        case needsImport
        /// Looking for or compiling models, with what is happening.
        case preparing(String)
        case ready
        case failed(String)
    }

    @Published private(set) var state: State = .preparing("Looking for models…")
    /// The manifest of the installed export.
    @Published private(set) var manifest: ExportManifest?

    /// Where the compiled models live (Application Support/Models).
    nonisolated let compiledFolder: URL

    init() {
        let fm = FileManager.default
        let support = (try? fm.url(for: .applicationSupportDirectory, in: .userDomainMask, appropriateFor: nil, create: true))
            ?? fm.temporaryDirectory
        compiledFolder = support.appendingPathComponent("Models", isDirectory: true)
    }

    /// The styles of the installed export, else the ones the app was generated for.
    var styles: [ExportStyle] { manifest?.styles ?? GeneratedExport.styles }

    var defaultStyle: String { manifest?.defaultStyleName ?? GeneratedExport.defaultStyle }

    var multifunction: Bool { manifest?.multifunction ?? GeneratedExport.multifunction }

    /// At launch: uses the compiled models when they are complete and current, else
    /// compiles the bundled ones (or waits for an import).
    func prepare() async {
        let bundled = GeneratedExport.bundledModelsURL.flatMap { try? ExportManifest.read(in: $0) }
        if let installed = try? ExportManifest.read(in: compiledFolder),
           Self.missingFiles(in: compiledFolder, for: installed).isEmpty,
           bundled == nil || bundled?.created == installed.created {
            manifest = installed
            state = .ready
            return
        }
        switch GeneratedExport.modelSource {
        case .bundled:
            guard let folder = GeneratedExport.bundledModelsURL else {
                state = .failed("The app has no bundled Models folder; regenerate it with `atelier export ios-app --embed`.")
                return
            }
            await install(from: folder)
        case .imported:
            state = .needsImport
        }
    }

    /// Installs an export folder picked in the Files app.
    func importFolder(_ url: URL) async {
        let scoped = url.startAccessingSecurityScopedResource()
        defer {
            if scoped { url.stopAccessingSecurityScopedResource() }
        }
        await install(from: url)
    }

    /// The files a complete installed export has in `folder`.
    nonisolated static func requiredFiles(for manifest: ExportManifest) -> [String] {
        manifest.packages.map { $0.name + ".mlmodelc" } + GeneratedExport.tokenizerFiles + [GeneratedExport.manifestFile]
    }

    nonisolated static func missingFiles(in folder: URL, for manifest: ExportManifest) -> [String] {
        requiredFiles(for: manifest).filter { !FileManager.default.fileExists(atPath: folder.appendingPathComponent($0).path) }
    }

    /// Checks that the export has what the pipeline cannot do without.
    nonisolated static func checkPipelineModels(_ manifest: ExportManifest) throws {
        let names = Set(manifest.packages.map(\.name))
        var missing = ["TextEncoder", "VAEDecoder"].filter { !names.contains($0) }
        let chunked = names.contains("UnetChunk1") && names.contains("UnetChunk2")
        if !chunked && !names.contains("Unet") {
            missing.append("Unet (or UnetChunk1 + UnetChunk2)")
        }
        if !missing.isEmpty {
            throw AppError("The export has no \(missing.joined(separator: ", ")) package.")
        }
    }

    private func install(from source: URL) async {
        let fm = FileManager.default
        let staging = compiledFolder.deletingLastPathComponent().appendingPathComponent("Models.partial", isDirectory: true)
        do {
            let manifest = try ExportManifest.read(in: source)
            try Self.checkPipelineModels(manifest)
            PipelineRunner.shared.unload()
            try? fm.removeItem(at: staging)
            try fm.createDirectory(at: staging, withIntermediateDirectories: true)
            for (index, package) in manifest.packages.enumerated() {
                guard !package.path.contains("/"), !package.path.hasPrefix(".") else {
                    throw AppError("\(GeneratedExport.manifestFile) names a package outside the export folder: \(package.path)")
                }
                state = .preparing("Compiling \(package.name) (\(index + 1) of \(manifest.packages.count))…")
                let packageURL = source.appendingPathComponent(package.path)
                let destination = staging.appendingPathComponent(package.name + ".mlmodelc")
                if packageURL.pathExtension == "mlmodelc" {
                    // Compiled on a Mac already (`xcrun coremlcompiler compile`).
                    try fm.copyItem(at: packageURL, to: destination)
                } else {
                    let compiled = try await MLModel.compileModel(at: packageURL)
                    try fm.moveItem(at: compiled, to: destination)
                }
            }
            for name in GeneratedExport.tokenizerFiles + [GeneratedExport.manifestFile] {
                try fm.copyItem(at: source.appendingPathComponent(name), to: staging.appendingPathComponent(name))
            }
            let missing = Self.missingFiles(in: staging, for: manifest)
            guard missing.isEmpty else {
                throw AppError("Missing after compiling: \(missing.joined(separator: ", "))")
            }
            if fm.fileExists(atPath: compiledFolder.path) {
                try fm.removeItem(at: compiledFolder)
            }
            try fm.moveItem(at: staging, to: compiledFolder)
            self.manifest = manifest
            state = .ready
        } catch {
            try? fm.removeItem(at: staging)
            state = .failed(error.localizedDescription)
        }
    }
}

/// Holds one loaded pipeline at a time (they are large) and runs work on it on its own queue,
/// off the main thread.
final class PipelineRunner: @unchecked Sendable {
    static let shared = PipelineRunner()

    private let queue = DispatchQueue(label: "atelier.pipeline", qos: .userInitiated)
    private var pipeline: StableDiffusionPipeline?
    private var key: String?

    /// Runs `body` with the pipeline for `style` on `computeUnits`, loading it first if needed.
    /// Multifunction exports select the style's function with `MLModelConfiguration.functionName`.
    func run<T>(
        folder: URL,
        style: ExportStyle?,
        multifunction: Bool,
        computeUnits: MLComputeUnits,
        _ body: @escaping @Sendable (StableDiffusionPipeline) throws -> T
    ) async throws -> T {
        try await withCheckedThrowingContinuation { continuation in
            queue.async {
                do {
                    let pipeline = try self.load(folder: folder, style: style, multifunction: multifunction, computeUnits: computeUnits)
                    continuation.resume(returning: try body(pipeline))
                } catch {
                    continuation.resume(throwing: error)
                }
            }
        }
    }

    /// Drops the loaded pipeline (before the models are replaced).
    func unload() {
        queue.sync {
            pipeline?.unloadResources()
            pipeline = nil
            key = nil
        }
    }

    private func load(folder: URL, style: ExportStyle?, multifunction: Bool, computeUnits: MLComputeUnits) throws -> StableDiffusionPipeline {
        let function = multifunction ? (style?.function ?? style?.name) : nil
        let wanted = "\(folder.path)|\(function ?? "-")|\(computeUnits.rawValue)"
        if let pipeline, key == wanted {
            return pipeline
        }
        pipeline?.unloadResources()
        pipeline = nil
        key = nil
        let configuration = MLModelConfiguration()
        configuration.computeUnits = computeUnits
        if let function {
            if #available(iOS 18.0, macOS 15.0, *) {
                configuration.functionName = function
            } else {
                throw AppError("This export keeps several styles in one package, which needs iOS 18 or macOS 15.")
            }
        }
        #if os(iOS)
        let reduceMemory = true  // Apple's advice for iPhone and iPad
        #else
        let reduceMemory = false
        #endif
        let loaded = try StableDiffusionPipeline(
            resourcesAt: folder,
            controlNet: [],
            configuration: configuration,
            disableSafety: true,
            reduceMemory: reduceMemory
        )
        try loaded.loadResources()
        pipeline = loaded
        key = wanted
        return loaded
    }
}

/// A flag another thread sets to stop a generation at the next step.
final class CancelFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false

    var isSet: Bool {
        lock.lock()
        defer { lock.unlock() }
        return value
    }

    func set(_ newValue: Bool) {
        lock.lock()
        value = newValue
        lock.unlock()
    }
}
