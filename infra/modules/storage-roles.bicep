// Least-privilege data-plane roles on the data account, each scoped to one container (or queue):
//   app identity: Blob Data Reader on `models` and `batch-in`, Blob Data Contributor on `batch-out`,
//                 Queue Data Contributor on the blob trigger's poison queue only;
//   deployer (whoever deploys: the GitHub OIDC principal or the azd user; optional): Blob Data
//                 Contributor on `models` for `ptd publish` and `ptd activate`, on `training` for the
//                 scheduled retraining (ptd snapshot), and on `batch-in` and
//                 `batch-out` for the post-deploy smoke test (it uploads one small file and reads,
//                 then deletes, the results).

@description('Name of the data storage account.')
param storageAccountName string

param modelsContainerName string
param trainingContainerName string
param batchInContainerName string
param batchOutContainerName string
param poisonQueueName string

@description('Principal id of the Function App identity.')
param appPrincipalId string

@description('Object id of the deployment principal (GitHub OIDC service principal); empty to skip.')
param deployerPrincipalId string = ''

@description('Principal type of the deployer; empty lets Azure look it up.')
@allowed([
  ''
  'ServicePrincipal'
  'User'
  'Group'
])
param deployerPrincipalType string = ''

var storageBlobDataReader = '2a2b9908-6ea1-4ae2-8e65-a410df84e7d1'
var storageBlobDataContributor = 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
var storageQueueDataContributor = '974c5e8b-45b9-4653-ba55-5f855dd0fb88'

resource account 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' existing = {
  parent: account
  name: 'default'
}

resource models 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: blobService
  name: modelsContainerName
}

resource training 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: blobService
  name: trainingContainerName
}

resource batchIn 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: blobService
  name: batchInContainerName
}

resource batchOut 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: blobService
  name: batchOutContainerName
}

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' existing = {
  parent: account
  name: 'default'
}

resource poisonQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' existing = {
  parent: queueService
  name: poisonQueueName
}

resource appModelsReader 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(models.id, appPrincipalId, storageBlobDataReader)
  scope: models
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataReader)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource appBatchInReader 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(batchIn.id, appPrincipalId, storageBlobDataReader)
  scope: batchIn
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataReader)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource appBatchOutContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(batchOut.id, appPrincipalId, storageBlobDataContributor)
  scope: batchOut
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataContributor)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource appPoisonQueueContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(poisonQueue.id, appPrincipalId, storageQueueDataContributor)
  scope: poisonQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageQueueDataContributor)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// principalType is optional in a role assignment; left out (null), Azure resolves it, so the same
// template serves a service principal (GitHub) and a user (azd up).
resource deployerModelsContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(deployerPrincipalId)) {
  name: guid(models.id, deployerPrincipalId, storageBlobDataContributor)
  scope: models
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataContributor)
    principalId: deployerPrincipalId
    principalType: empty(deployerPrincipalType) ? null : deployerPrincipalType
  }
}

resource deployerTrainingContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(deployerPrincipalId)) {
  name: guid(training.id, deployerPrincipalId, storageBlobDataContributor)
  scope: training
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataContributor)
    principalId: deployerPrincipalId
    principalType: empty(deployerPrincipalType) ? null : deployerPrincipalType
  }
}

resource deployerBatchInContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(deployerPrincipalId)) {
  name: guid(batchIn.id, deployerPrincipalId, storageBlobDataContributor)
  scope: batchIn
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataContributor)
    principalId: deployerPrincipalId
    principalType: empty(deployerPrincipalType) ? null : deployerPrincipalType
  }
}

resource deployerBatchOutContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(deployerPrincipalId)) {
  name: guid(batchOut.id, deployerPrincipalId, storageBlobDataContributor)
  scope: batchOut
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataContributor)
    principalId: deployerPrincipalId
    principalType: empty(deployerPrincipalType) ? null : deployerPrincipalType
  }
}
